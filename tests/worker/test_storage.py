"""The worker's data folder on its own: short sources stay in memory, long ones round-trip through a file (any
UTF-8), leftovers of a previous run are removed, and a temporary folder goes at close."""

from __future__ import annotations

from pathlib import Path

from services.worker.storage import SPOOL_ABOVE_BYTES, RequestStorage


def test_sources_round_trip_and_leave_nothing_behind(tmp_path: Path) -> None:
    storage = RequestStorage(tmp_path)
    short = storage.put_sources("r1", "https://example.com/a.png", "https://example.com/m.png")
    assert short.path is None and storage.take_sources(short) == ("https://example.com/a.png",
                                                                  "https://example.com/m.png")
    image, mask = "data:image/png;base64," + "é" * SPOOL_ABOVE_BYTES, "https://example.com/m-ü.png"
    long = storage.put_sources("r2", image, mask)
    assert long.path is not None and long.path.stat().st_size == long.nbytes == len(image.encode()) + len(
        mask.encode())
    assert storage.take_sources(long) == (image, mask) and not long.path.exists()
    dropped = storage.put_sources("r3", image, mask)
    storage.drop_sources(dropped)
    assert list(storage.inputs.iterdir()) == []


def test_a_configured_folder_is_emptied_of_old_runs_and_a_temporary_one_removed(tmp_path: Path) -> None:
    (tmp_path / "results" / "old").mkdir(parents=True)
    (tmp_path / "keep.txt").write_text("the operator's")
    storage = RequestStorage(tmp_path)
    assert list(storage.results.iterdir()) == []
    storage.write_file("r1", "0.png", b"png")
    storage.remove_results("r1")
    storage.close()
    assert (tmp_path / "keep.txt").exists() and not (tmp_path / "results").exists()

    temporary = RequestStorage(None)
    body, path = temporary.keep_body("r2", {"images": ["x" * 100_000]})
    assert body is None and path is not None and path.exists()
    assert temporary.keep_body("r3", {"images": []}) == ({"images": []}, None)
    temporary.close()
    assert not temporary.root.exists()
