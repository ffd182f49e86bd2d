"""Residual-stream hooks on every supported family: exact capture, exact self-patch, zero add, errors."""

from __future__ import annotations

import pytest
import torch

from lab import LabError, hooks

PROMPTS = ["K = walnut. R = K. What is R?\nAnswer:", "On Monday at dawn, Mara"]


def _run(base):
    ids, mask = base.encode(PROMPTS)
    return ids, mask


def test_capture_equals_output_hidden_states(any_base):
    b = any_base
    ids, mask = _run(b)
    ref = b.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    with hooks.capture(b) as cache:
        out = b.model(input_ids=ids, attention_mask=mask)
    expected = hooks.hidden_states_as_cache_order(b, ref.hidden_states)
    assert set(expected) <= set(cache.keys())
    for name, value in expected.items():
        assert torch.equal(cache[name], value), name
    assert torch.equal(out.logits, ref.logits)
    # resid_post of block i is resid_pre of block i+1
    for i in range(b.n_layers - 1):
        assert torch.equal(cache[f"blocks.{i}.resid_post"], cache[f"blocks.{i + 1}.resid_pre"])
    assert cache.stack("resid_post").shape == (b.n_layers, *ids.shape, b.d_model)


@pytest.mark.parametrize("site", ["resid_pre", "resid_post"])
def test_self_patch_is_bit_identical(any_base, site):
    b = any_base
    ids, mask = _run(b)
    with hooks.capture(b) as cache:
        ref = b.model(input_ids=ids, attention_mask=mask).logits
    for i in range(b.n_layers):
        with hooks.patch(b, i, cache[f"blocks.{i}.{site}"], site=site):
            got = b.model(input_ids=ids, attention_mask=mask).logits
        assert (got - ref).abs().max().item() == 0.0
        kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="sum")
        assert kl.item() == 0.0
        # patching a subset of positions with its own values is exact too
        with hooks.patch(b, i, cache[f"blocks.{i}.{site}"][:, [0, 2]], positions=[0, 2], site=site):
            assert torch.equal(b.model(input_ids=ids, attention_mask=mask).logits, ref)


def test_stream_at_equals_a_full_capture_and_runs_only_the_blocks_before_it(any_base):
    b = any_base
    ids, mask = _run(b)
    ref_logits = b.model(input_ids=ids, attention_mask=mask).logits
    with hooks.capture(b) as cache:
        b.model(input_ids=ids, attention_mask=mask)
    ran = []  # blocks whose computation started (a submodule of theirs ran), and the final norm
    handles = [sub.register_forward_pre_hook(lambda m, a, i=i: None if i in ran else ran.append(i))
               for i, blk in enumerate(b.blocks) for sub in blk.children()]
    handles.append(b.final_norm.register_forward_pre_hook(lambda m, a: ran.append("final")))
    try:
        for layer, site in [(0, "resid_pre"), (b.n_layers - 1, "resid_pre"), (b.n_layers - 1, "resid_post")]:
            ran.clear()
            got = hooks.stream_at(b, layer, site, input_ids=ids, attention_mask=mask)
            assert torch.equal(got, cache[f"blocks.{layer}.{site}"]), (layer, site)
            assert ran == list(range(layer + (site == "resid_post"))), (layer, site, ran)  # nothing after it ran
            assert not got.requires_grad
    finally:
        for h in handles:
            h.remove()
    # the hook is gone and the next full forward is unchanged
    assert torch.equal(b.model(input_ids=ids, attention_mask=mask).logits, ref_logits)
    # grad=True keeps the graph to the input embeddings
    emb = b.model.get_input_embeddings()(ids).detach().requires_grad_(True)
    h = hooks.stream_at(b, b.n_layers - 1, "resid_pre", inputs_embeds=emb, attention_mask=mask, grad=True)
    h.sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    with pytest.raises(LabError, match="out of range"):
        hooks.stream_at(b, b.n_layers, "resid_pre", input_ids=ids)


def test_patch_changes_output(any_base):
    b = any_base
    ids, mask = _run(b)
    ref = b.model(input_ids=ids, attention_mask=mask).logits
    with hooks.patch(b, 0, torch.zeros(b.d_model), positions=[1]):
        got = b.model(input_ids=ids, attention_mask=mask).logits
    assert not torch.equal(got, ref)
    assert torch.equal(got[:, :1], ref[:, :1])  # causal: earlier positions untouched


@pytest.mark.parametrize("site", ["resid_pre", "resid_post"])
def test_add_zero_is_bit_identical_and_nonzero_is_not(any_base, site):
    b = any_base
    ids, mask = _run(b)
    ref = b.model(input_ids=ids, attention_mask=mask).logits
    for i in range(b.n_layers):
        with hooks.add(b, i, torch.zeros(b.d_model), site=site):
            assert torch.equal(b.model(input_ids=ids, attention_mask=mask).logits, ref)
        with hooks.add(b, i, lambda h: torch.zeros_like(h), site=site):  # a callable (module-style)
            assert torch.equal(b.model(input_ids=ids, attention_mask=mask).logits, ref)
    with hooks.add(b, 0, torch.ones(b.d_model), site=site):
        assert not torch.equal(b.model(input_ids=ids, attention_mask=mask).logits, ref)


@pytest.mark.parametrize("site", ["resid_pre", "resid_post"])
def test_add_to_every_layer_equals_add_to_layers(smoke_gpt2, site):
    """The channels' fast path: one fixed delta per layer, the same stream as the general mapping."""
    b = smoke_gpt2
    ids, mask = _run(b)
    deltas = torch.randn(b.n_layers, 1, 1, b.d_model, generator=torch.Generator().manual_seed(0)) * 0.1
    with hooks.add_to_layers(b, dict(enumerate(deltas.unbind(0))), site=site):
        ref = b.model(input_ids=ids, attention_mask=mask).logits
    with hooks.add_to_every_layer(b, deltas.unbind(0), site=site):
        assert torch.equal(b.model(input_ids=ids, attention_mask=mask).logits, ref)
    _assert_nothing_active(b)
    with pytest.raises(LabError, match=f"one delta per layer: 'smoke-gpt2' has {b.n_layers} layers, got 1"):
        with hooks.add_to_every_layer(b, deltas.unbind(0)[:1]):
            pass
    with pytest.raises(LabError, match="site must be one of"):
        with hooks.add_to_every_layer(b, deltas.unbind(0), site="resid_mid"):
            pass
    with pytest.raises(LabError, match="does not broadcast"):  # the shape is still checked, on the first forward
        with hooks.add_to_every_layer(b, [torch.zeros(3, 1, b.d_model)] * b.n_layers):
            b.model(input_ids=ids, attention_mask=mask)
    _assert_nothing_active(b)


def _assert_nothing_active(b):
    """No lab hook active in this thread, and every module back to its own forward (and no torch hook)."""
    assert hooks.active(b) == 0
    for m in (*b.blocks, b.final_norm):
        assert "forward" not in vars(m) and "_lab_inner_forward" not in vars(m)
        assert not m._forward_pre_hooks and not m._forward_hooks


def test_hooks_removed_even_on_error(smoke_gpt2):
    b = smoke_gpt2
    ids, mask = _run(b)
    ref = b.model(input_ids=ids, attention_mask=mask).logits
    with pytest.raises(RuntimeError, match="boom"):
        with hooks.add(b, 0, torch.ones(b.d_model)):
            raise RuntimeError("boom")
    _assert_nothing_active(b)
    assert torch.equal(b.model(input_ids=ids, attention_mask=mask).logits, ref)


def test_bad_layer_shape_dtype(smoke_gpt2):
    b = smoke_gpt2
    ids, mask = _run(b)
    with pytest.raises(LabError, match="out of range"):
        with hooks.add(b, b.n_layers, torch.zeros(b.d_model)):
            pass
    with pytest.raises(LabError, match="layer must be an int"):
        with hooks.capture(b, layers=["0"]):
            pass
    with pytest.raises(LabError, match="does not broadcast"):
        with hooks.add(b, 0, torch.zeros(b.d_model + 1)):
            b.model(input_ids=ids)
    # broadcastable with the stream but not *to* it: h + delta would gain a dimension, so it is refused
    with pytest.raises(LabError, match="does not broadcast"):
        with hooks.add(b, 0, torch.zeros(2, 1, 1, b.d_model)):
            b.model(input_ids=ids)
    with pytest.raises(LabError, match="dtype"):
        with hooks.patch(b, 0, torch.zeros(b.d_model, dtype=torch.float64)):
            b.model(input_ids=ids)
    with pytest.raises(LabError, match="positions"):
        with hooks.patch(b, 0, torch.zeros(b.d_model), positions=[999]):
            b.model(input_ids=ids)
    with pytest.raises(LabError, match="site must be"):
        with hooks.add(b, 0, torch.zeros(b.d_model), site="mlp_out"):
            pass
    _assert_nothing_active(b)


def test_run_from_input_embeddings(any_base):
    b = any_base
    ids, mask = _run(b)
    ref = b.model(input_ids=ids, attention_mask=mask).logits
    emb = b.embed(ids)
    out, cache = hooks.run_with_cache(b, inputs_embeds=emb, attention_mask=mask)
    assert torch.equal(out.logits, ref)
    assert "final" in cache
    with pytest.raises(LabError, match="inputs_embeds must be"):
        hooks.forward(b, inputs_embeds=emb[..., :-1])
    with pytest.raises(LabError, match="exactly one"):
        hooks.forward(b)


def test_a_context_acts_only_on_its_own_threads_forwards(smoke_gpt2):
    """The app shares one cached base across Streamlit sessions (threads): one session's context must not
    touch another session's concurrent forward."""
    import threading

    b = smoke_gpt2
    ids, mask = _run(b)
    ref = b.model(input_ids=ids, attention_mask=mask).logits
    opened, done, inside = threading.Event(), threading.Event(), {}

    def session():
        with hooks.add(b, 0, torch.ones(b.d_model)), hooks.capture(b) as cache:
            inside["logits"] = b.model(input_ids=ids, attention_mask=mask).logits
            opened.set()
            done.wait(30)
        inside["captured"] = len(cache)

    t = threading.Thread(target=session)
    t.start()
    try:
        assert opened.wait(30)
        assert hooks.active(b) == 0  # this thread has none, while the other holds two contexts open
        with hooks.capture(b) as mine:
            assert torch.equal(b.model(input_ids=ids, attention_mask=mask).logits, ref)
        assert torch.equal(mine["blocks.0.resid_pre"], b.embed(ids) + b.model.transformer.wpe(torch.arange(ids.shape[1])))
    finally:
        done.set()
        t.join()
    assert not torch.equal(inside["logits"], ref)
    assert inside["captured"] == 2 * b.n_layers + 1  # its own forward only, not this thread's
    _assert_nothing_active(b)


def test_nested_contexts_apply_in_order_and_a_deep_copy_dispatches_once(smoke_gpt2):
    import copy

    b = smoke_gpt2
    ids, mask = _run(b)
    one = torch.ones(b.d_model)
    with hooks.add(b, 1, one):
        twice_outer = b.model(input_ids=ids, attention_mask=mask).logits
        with hooks.add(b, 1, one):  # nested: both add, the inner after the outer
            twice = b.model(input_ids=ids, attention_mask=mask).logits
    with hooks.add(b, 1, 2 * one):
        assert torch.allclose(b.model(input_ids=ids, attention_mask=mask).logits, twice, atol=1e-5)
    assert not torch.equal(twice, twice_outer)
    # a deep copy taken while a context is open carries the dispatching forward over, bound to the copy; a
    # context on the copy adds once, on the copy only, and closing everything restores both models
    with hooks.add(b, 1, one):
        c = copy.deepcopy(b)
    copied = vars(c.blocks[1])["forward"]
    assert hooks._is_dispatching(copied) and copied.__self__ is c.blocks[1]
    assert torch.equal(c.model(input_ids=ids, attention_mask=mask).logits, b.model(input_ids=ids, attention_mask=mask).logits)
    with hooks.add(c, 1, one):
        assert vars(c.blocks[1])["forward"] is copied  # not wrapped a second time
        assert torch.equal(c.model(input_ids=ids, attention_mask=mask).logits, twice_outer)
        assert hooks.active(b) == 0
    _assert_nothing_active(b)
    _assert_nothing_active(c)


def test_a_forward_already_on_the_instance_is_kept_and_restored(smoke_gpt2):
    """accelerate's `add_hook_to_module` (device maps, offloading) puts its own `forward` on the instance: a
    context runs around it and leaves it in place on exit."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    b = smoke_gpt2
    ids, mask = _run(b)
    ref = b.model(input_ids=ids, attention_mask=mask).logits
    calls = []

    class Count(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append(1)
            return args, kwargs

    block = b.blocks[0]
    add_hook_to_module(block, Count())
    try:
        theirs = vars(block)["forward"]
        with hooks.add(b, 0, torch.zeros(b.d_model)), hooks.capture(b, layers=[0]) as cache:
            assert torch.equal(b.model(input_ids=ids, attention_mask=mask).logits, ref)
        assert len(calls) == 1 and "blocks.0.resid_post" in cache
        assert vars(block)["forward"] is theirs and "_lab_inner_forward" not in vars(block)
    finally:
        remove_hook_from_module(block)
        # accelerate leaves the class's bound forward on the instance: drop it, the fixture is shared
        if getattr(vars(block).get("forward"), "__func__", None) is type(block).forward:
            del vars(block)["forward"]
    _assert_nothing_active(b)
    # one accelerate puts over ours while a context is open stays when the context closes, ours idle beneath
    with hooks.add(b, 0, torch.ones(b.d_model)):
        add_hook_to_module(block, Count())
    try:
        calls.clear()
        assert torch.equal(b.model(input_ids=ids, attention_mask=mask).logits, ref) and len(calls) == 1
    finally:
        remove_hook_from_module(block)  # puts back the forward it wrapped: ours, idle
        assert hooks._is_dispatching(vars(block)["forward"])
        del vars(block)["forward"]  # the fixture is shared
    _assert_nothing_active(b)
