"""The Gmail query language: lexer, parser, syntax tree and plan, and the compilers to each
backend. Parsing and compiling are pure (no I/O)."""
