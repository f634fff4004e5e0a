"""The stage directory protocol: atomic writes, and corrupt files reported, never crashing."""

import json
import os

import pytest

from budgetlab.stagedir import StageDir, StageFileError, atomic_write_json


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "a" / "r.json", {"x": 1})
    atomic_write_json(tmp_path / "a" / "r.json", {"x": 2})
    assert json.loads((tmp_path / "a" / "r.json").read_text()) == {"x": 2}
    assert os.listdir(tmp_path / "a") == ["r.json"]


@pytest.mark.parametrize("content,message", [
    ('{"stage_id": "a", "metr', "invalid JSON"),
    ("", "empty file"),
    ("[1, 2]", "expected a JSON object"),
    ('{"stage_id": "a"}', "missing key(s) metrics"),
    ('{"stage_id": "a", "metrics": 3}', "'metrics' is not an object"),
])
def test_corrupt_result_is_a_clear_error(tmp_path, content, message):
    st = StageDir(tmp_path)
    st.result_path.write_text(content)
    with pytest.raises(StageFileError) as err:
        st.read_result()
    assert message in str(err.value) and str(st.result_path) in str(err.value)


def test_garbage_bytes_and_progress(tmp_path):
    st = StageDir(tmp_path)
    st.result_path.write_bytes(b"\x00\xff\xfe garbage")
    with pytest.raises(StageFileError):
        st.read_result()
    st.progress_path.write_text('{"step": 3')
    assert st.read_progress() is None  # advisory: unreadable progress is simply absent
    st.write_progress(step=4, loss=1.5)
    assert st.read_progress()["step"] == 4
    assert StageDir(tmp_path / "nothing").read_result() is None


def test_error_record_fallback(tmp_path):
    st = StageDir(tmp_path)
    st.error_path.write_text("{not json")
    err = st.read_error()
    assert err["outcome"] == "FAILED" and "invalid JSON" in err["message"]


def test_the_stop_signal_is_not_swallowed_by_a_library_fallback():
    """The job's preemption signal raises Interrupted wherever it lands. transformers loads
    models and tokenizers inside `except Exception` fallbacks: an Interrupted that such a block
    could catch let an eval run on to COMPLETED after its stop request (seen on CI)."""
    import os
    import signal
    import time

    from budgetlab.backends.job import _install_interrupt_handler, _preempt_signal
    from budgetlab.worker import Interrupted, is_interruption

    old = _install_interrupt_handler()
    try:
        with pytest.raises(Interrupted) as caught:
            try:   # what a library's fallback looks like
                os.kill(os.getpid(), _preempt_signal())
                time.sleep(5)
            except Exception:
                pass
        assert is_interruption(caught.value)
    finally:
        signal.signal(_preempt_signal(), old)
