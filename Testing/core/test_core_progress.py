import threading

import pytest

from deepimaging.core.progress import CancelToken, Cancelled, check_cancel, report, sub_progress, tqdm_progress


def test_report_clamps_and_tolerates_none():
    seen = []
    report(lambda f, m: seen.append((f, m)), 1.7, "x")
    report(lambda f, m: seen.append((f, m)), -1, "y")
    report(None, 0.5, "ignored")
    assert seen == [(1.0, "x"), (0.0, "y")]


def test_sub_progress_maps_range():
    seen = []
    child = sub_progress(lambda f, m: seen.append(f), 0.5, 0.75)
    child(0.0, "")
    child(1.0, "")
    assert seen == pytest.approx([0.5, 0.75])
    assert sub_progress(None, 0, 1) is None


def test_cancel_token_from_another_thread():
    token = CancelToken()
    check_cancel(token)
    check_cancel(None)
    t = threading.Thread(target=token.cancel)
    t.start()
    t.join()
    assert token.cancelled
    with pytest.raises(Cancelled):
        check_cancel(token)


def test_tqdm_adapter_accepts_fractions():
    with tqdm_progress("test", total=10) as cb:
        cb(0.3, "a")
        cb(1.0, "done")


def test_progress_lines_mode_for_background_processes(monkeypatch, capsys):
    monkeypatch.setenv("DEEPIMAGING_PROGRESS", "lines")
    with tqdm_progress("train") as cb:
        cb(0.25, "epoch 1/4")
        cb(0.2501, "too close, skipped")
        cb(1.0, "done")
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["PROGRESS 0.2500 train: epoch 1/4", "PROGRESS 1.0000 train: done"]

