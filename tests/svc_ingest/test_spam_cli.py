"""`mailmesh spam train|eval` on folders of raw messages, straight on the KV store (no mesh)."""

from __future__ import annotations

import asyncio
import json
from array import array
from pathlib import Path

import pytest

from mailmesh_common.cli.spam import main
from mailmesh_common.kv import open_database
from svc_ingest.spam import SpamFilter
from tests.svc_ingest.test_spam_filter import HAM_WORDS, SPAM_WORDS, corpus


def write(folder: Path, messages: list[bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, raw in enumerate(messages):
        (folder / f"{i:04d}.eml").write_bytes(raw)
    return folder


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    ham = corpus(HAM_WORDS, 30, "h")
    spam = corpus(SPAM_WORDS, 30, "s")
    out = {
        "ham": write(tmp_path / "train" / "ham", ham[:24]),
        "spam": write(tmp_path / "train" / "spam", spam[:24]),
        "held_ham": write(tmp_path / "held" / "ham", ham[24:]),
        "held_spam": write(tmp_path / "held" / "spam", spam[24:]),
    }
    # a dot file and a nested folder: the first is skipped, the second included
    (out["ham"] / ".DS_Store").write_bytes(b"\x00\x01junk")
    write(out["ham"] / "2002-07", corpus(HAM_WORDS, 2, "nested"))
    return out


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, object], str]:
    code = main([*argv, "--jobs", "1"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else {}), err


def model_counts(data: Path, user: str = "") -> tuple[int, int]:
    async def go() -> tuple[int, int]:
        db = open_database(data / "ingest.db")
        try:
            c = await SpamFilter(db).counts(user)
            return c.spam, c.ham
        finally:
            await db.close()

    return asyncio.run(go())


def test_train_then_eval_prints_counts_and_rates(tmp_path: Path, folders: dict[str, Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    code, out, _ = run(capsys, "train", "--ham", str(folders["ham"]), "--spam", str(folders["spam"]),
                       "--data-dir", str(data))
    assert code == 0
    assert out["trained"] == {"ham": 26, "spam": 24}
    assert out["model"] == {"spam_messages": 24, "ham_messages": 26}
    assert (data / "ingest.db").is_file()
    combiner = out["combiner"]
    assert isinstance(combiner, dict) and combiner["fitted"] is True
    assert combiner["cross_validation"] == {"folds": 5, "spam": 24, "ham": 26, "detection_rate": 1.0,
                                            "false_positive_rate": 0.0}

    code, report, _ = run(capsys, "eval", "--ham", str(folders["held_ham"]), "--spam",
                          str(folders["held_spam"]), "--data-dir", str(data))
    assert code == 0
    assert report["ham"] == {"messages": 6, "flagged_spam": 0, "passed": 6}
    assert report["spam"] == {"messages": 6, "flagged_spam": 6, "missed": 0}
    assert report["detection_rate"] == 1.0 and report["false_positive_rate"] == 0.0
    assert report["threshold"] == 5.0
    assert report["combiner"] is True  # scored with the combiner train fitted
    assert "not checked" in str(report["auth"])
    assert "misclassified" not in report and "warning" not in report
    assert model_counts(data) == (24, 26)  # eval never trains


def byte_weights(data: Path) -> array[int]:
    """The byte model's global weights stored in data's ingest.db."""
    async def go() -> array[int]:
        db = open_database(data / "ingest.db")
        try:
            return (await SpamFilter(db).bytes.snapshot()).weights
        finally:
            await db.close()

    return asyncio.run(go())


def test_training_twice_changes_nothing(tmp_path: Path, folders: dict[str, Path],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    args = ("train", "--ham", str(folders["ham"]), "--spam", str(folders["spam"]), "--data-dir", str(data))
    assert run(capsys, *args)[0] == 0
    weights = byte_weights(data)
    assert any(weights)  # train fitted the byte model too, stored in the KV store
    assert run(capsys, *args)[1]["model"] == {"spam_messages": 24, "ham_messages": 26}
    assert byte_weights(data) == weights
    # with worker processes (the byte model's trainings run in parallel): the very same fit
    other = tmp_path / "other"
    code = main(["train", "--ham", str(folders["ham"]), "--spam", str(folders["spam"]),
                 "--data-dir", str(other), "--jobs", "2"])
    assert code == 0 and byte_weights(other) == weights
    capsys.readouterr()
    # the same messages filed the other way round move between classes
    code, out, _ = run(capsys, "train", "--spam", str(folders["ham"]), "--data-dir", str(data))
    assert code == 0 and out["model"] == {"spam_messages": 50, "ham_messages": 0}


def test_no_fit_and_user_training_keep_the_stored_combiner(tmp_path: Path, folders: dict[str, Path],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    code, out, _ = run(capsys, "train", "--ham", str(folders["ham"]), "--spam", str(folders["spam"]),
                       "--data-dir", str(data), "--no-fit")
    assert code == 0 and out["combiner"]["fitted"] is False  # type: ignore[index]
    code, report, _ = run(capsys, "eval", "--ham", str(folders["held_ham"]), "--spam",
                          str(folders["held_spam"]), "--data-dir", str(data))
    assert code == 0 and report["combiner"] is False  # fixed mapping, still classifies
    assert report["detection_rate"] == 1.0 and report["false_positive_rate"] == 0.0
    code, out, _ = run(capsys, "train", "--spam", str(folders["held_spam"]), "--user", "u-1",
                       "--data-dir", str(data))
    assert code == 0 and "per-user" in str(out["combiner"])
    code, out, _ = run(capsys, "train", "--ham", str(folders["held_ham"]), "--spam", str(folders["held_spam"]),
                       "--data-dir", str(data))
    assert code == 0 and out["combiner"]["fitted"] is False  # type: ignore[index]
    assert "too few messages" in out["combiner"]["why"]  # type: ignore[index]


def test_eval_threshold_details_and_untrained_warning(tmp_path: Path, folders: dict[str, Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    code, report, _ = run(capsys, "eval", "--ham", str(folders["held_ham"]), "--spam",
                          str(folders["held_spam"]), "--data-dir", str(data), "--threshold", "-1",
                          "--details")
    assert code == 0
    assert "untrained" in str(report["warning"])
    assert report["threshold"] == -1.0
    assert report["false_positive_rate"] == 1.0  # everything scores >= -1 with no model
    missed = report["misclassified"]
    assert isinstance(missed, list) and len(missed) == 6
    assert {m["class"] for m in missed} == {"ham"} and all("status" in m for m in missed)


def test_user_option_trains_that_users_adjustments(tmp_path: Path, folders: dict[str, Path],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    code, out, _ = run(capsys, "train", "--spam", str(folders["held_spam"]), "--user", "u-42",
                       "--data-dir", str(data))
    assert code == 0 and out["user"] == "u-42"
    assert model_counts(data, "u-42") == (6, 0)
    assert model_counts(data) == (6, 0)
    assert any(byte_weights(data))  # the byte model learnt them online (global and u-42's)


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "train", "--data-dir", str(tmp_path))
    assert code == 2 and "--ham DIR" in err
    code, _, err = run(capsys, "eval", "--ham", str(tmp_path / "missing"), "--data-dir", str(tmp_path))
    assert code == 2 and "not a directory" in err
    assert not (tmp_path / "ingest.db").exists()


def test_the_model_lives_in_ingest_db_or_foundationdb(tmp_path: Path) -> None:
    from mailmesh_common.config import load_settings
    from svc_ingest.spam import spam_db_url

    assert spam_db_url(load_settings(env={}, data_dir=str(tmp_path))) == str(tmp_path / "ingest.db")
    fdb = load_settings(env={"MAILMESH_FDB_CLUSTER_FILE": "/etc/foundationdb/fdb.cluster"})
    assert spam_db_url(fdb) == "fdb:/etc/foundationdb/fdb.cluster"
