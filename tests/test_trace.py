import pytest
import torch

import loka
from loka.trace import StopForward, add_at_positions, capture, run_until_stopped


@pytest.fixture(scope="module")
def tiny():
    return loka.load_model("tiny-llama")


def _ids(h, text="hello world"):
    return h.tokenizer(text, return_tensors="pt")


def test_capture_records_module_input_and_output(tiny):
    path = tiny.spec.mlp_out_path(1)
    enc = _ids(tiny)
    with capture(tiny.model, [path]) as rec:
        tiny.model(**enc)
    x, y = rec[path].input, rec[path].output
    assert torch.allclose(tiny.mlp_out(1)(x), y)
    assert not tiny.mlp_out(1)._forward_hooks and not tiny.mlp_out(1)._forward_pre_hooks


def test_stop_after_skips_upper_layers(tiny):
    calls = []
    h = tiny.block(3).register_forward_hook(lambda *a: calls.append(1))
    try:
        with capture(tiny.model, [tiny.spec.mlp_out_path(1)], stop_after=tiny.spec.block_path(1)) as rec:
            assert run_until_stopped(lambda: tiny.model(**_ids(tiny))) is None
        assert rec[tiny.spec.mlp_out_path(1)].input is not None and calls == []
    finally:
        h.remove()


def test_add_at_positions_changes_only_those_positions(tiny):
    enc = _ids(tiny, "abcdef")
    path = tiny.spec.block_path(2)
    with capture(tiny.model, [path], inputs=False) as rec:
        tiny.model(**enc)
    base = rec[path].output.clone()
    v = torch.ones(base.shape[-1])
    with add_at_positions(tiny.block(2), v, [(0, 3)]), capture(tiny.model, [path], inputs=False) as rec2:
        tiny.model(**enc)
    diff = (rec2[path].output - base).abs().sum(-1)[0]
    assert torch.allclose(rec2[path].output[0, 3], base[0, 3] + v)
    assert (diff[[0, 1, 2, 4, 5]] == 0).all()


def test_hooks_removed_after_an_exception(tiny):
    mod = tiny.block(1)
    with pytest.raises(StopForward), add_at_positions(mod, torch.zeros(64), [(0, 0)]):
        raise StopForward
    assert not mod._forward_hooks
