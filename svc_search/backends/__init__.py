"""Search backends behind one interface (base.Backend): tantivy embedded by default, Meilisearch
when MAILMESH_MEILI_URL is set (comma-separated URLs are shards)."""

from __future__ import annotations

from mailmesh_common.config import Settings
from svc_search.backends.base import Backend


def meili_urls(settings: Settings) -> list[str]:
    return [u.strip() for u in settings.meili_url.split(",") if u.strip()]


def open_backend(settings: Settings) -> Backend:
    """The configured backend (not started)."""
    urls = meili_urls(settings)
    if urls:
        from svc_search.backends.meili import MeiliBackend

        return MeiliBackend(urls, settings.meili_api_key)
    from svc_search.backends.tantivy import TantivyBackend

    return TantivyBackend(settings.data_dir / "search")
