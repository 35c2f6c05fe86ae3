"""Fixed action matrices: PROCESS / SKIP / EXIT semantics.

The reference next to the tests is the semantics' own formulation, built from the transformers model's own
decoder layers: for each layer, h = where(process[:, l], block(h), h), with the block run on all
tokens. A SKIP token's K/V inside that block come from norm(h_in) of its own residual, which is
exactly what the engine must write into its paged cache.
"""
import pytest
import torch

from anee_fast import EXIT, LLM, PROCESS, SKIP, SamplingParams
from conftest import ARCHS, build_model, hf_logits, num_layers_of, random_actions, random_ids

TIGHT = 1e-5     # same engine, different batching / chunking
HF_TOL = 1e-4    # engine vs transformers


def max_err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---- the reference ------------------------------------------------------------------------------

def reference_process_mask(actions) -> torch.Tensor:
    """[T, L] bool written out token by token: PROCESS runs the block; an EXIT at layer l makes
    layer l and every later layer a SKIP, whatever codes follow."""
    T, L = actions.shape
    mask = torch.zeros(T, L, dtype=torch.bool)
    for t in range(T):
        exited = False
        for l in range(L):
            code = int(actions[t, l])
            exited = exited or code == EXIT
            mask[t, l] = code == PROCESS and not exited
    return mask


def decoder_layers(model):
    return model.transformer.h if model.config.model_type == "gpt2" else model.model.layers


@torch.no_grad()
def where_reference(model, ids, actions):
    """(logits [T, V], residual entering each layer [L] x [T, hidden]) of
    h = where(process[:, l], block(h), h), using the HF model's own blocks, masks and RoPE."""
    process = reference_process_mask(actions)
    entering, handles = [], []

    def make_hook(l):
        def hook(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            entering.append(h_in[0].clone())
            out = output[0] if isinstance(output, tuple) else output
            new = torch.where(process[None, :, l, None], out, h_in)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
        return hook

    for l, layer in enumerate(decoder_layers(model)):
        handles.append(layer.register_forward_hook(make_hook(l), with_kwargs=True))
    try:
        logits = model(torch.as_tensor(ids)[None]).logits[0].float()
    finally:
        for handle in handles:
            handle.remove()
    return logits, entering


@torch.no_grad()
def hf_kv_projection(model, layer_idx, h, positions=None):
    """K, V [T, kv_heads, head_dim] that layer `layer_idx` of the HF model computes from the
    residual h [T, hidden] at `positions` (default 0..T-1): norm -> projection -> RoPE on K where
    the model uses it."""
    cfg = model.config
    T = h.shape[0]
    positions = torch.arange(T) if positions is None else torch.as_tensor(positions)
    layer = decoder_layers(model)[layer_idx]
    if cfg.model_type == "gpt2":
        heads = cfg.n_head
        d = cfg.n_embd // heads
        _, k, v = layer.attn.c_attn(layer.ln_1(h)).split(cfg.n_embd, dim=-1)
        return k.reshape(T, heads, d), v.reshape(T, heads, d)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    attn = layer.self_attn
    d = attn.head_dim
    x = layer.input_layernorm(h)
    k = attn.k_proj(x).reshape(1, T, -1, d).transpose(1, 2)     # [1, kv_heads, T, d]
    v = attn.v_proj(x).reshape(T, -1, d)
    cos, sin = model.model.rotary_emb(h[None], positions[None])
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    return k[0].transpose(0, 1), v


@torch.no_grad()
def head_of_embedding(model, ids):
    """lm_head(final_norm(embedding)): the logits when no layer runs."""
    ids = torch.as_tensor(ids)
    if model.config.model_type == "gpt2":
        tr = model.transformer
        h = tr.wte(ids) + tr.wpe(torch.arange(len(ids)))
        return model.lm_head(tr.ln_f(h)).float()
    return model.lm_head(model.model.norm(model.model.embed_tokens(ids))).float()


def run_pieces(llm, ids, actions):
    """Runs one sequence through the engine's own pieces (new_sequence, block manager, model
    runner) with fixed actions; returns (StepOutput, residual entering each layer, its slots)."""
    engine = llm.engine
    seq = engine.new_sequence(ids, SamplingParams(max_tokens=0), 1.0, "budget")
    engine.block_manager.allocate(seq.seq_id, len(seq))
    hidden = []
    try:
        out = engine.runner.run([(seq, len(seq))], list(range(len(seq))), fixed_actions=actions,
                                hidden_states=hidden)
        slots = torch.tensor([engine.block_manager.slot(seq.seq_id, p) for p in range(len(seq))])
    finally:
        engine.block_manager.free(seq.seq_id)
    return out, hidden, slots


# ---- the reference itself ------------------------------------------------------------------------

def test_reference_process_mask():
    actions = torch.tensor([[0, 0, 0, 0], [1, 0, 1, 0], [0, 2, 0, 0], [2, 1, 0, 2], [0, 0, 0, 2]],
                           dtype=torch.int8)
    expected = torch.tensor([[1, 1, 1, 1], [0, 1, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]],
                            dtype=torch.bool)
    assert torch.equal(reference_process_mask(actions), expected)


@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa"])
def test_where_reference_at_all_process_is_hf(arch):
    model = build_model(arch)
    ids = random_ids(model, 13, seed=1)
    actions = torch.zeros(13, num_layers_of(model), dtype=torch.int8)
    logits, entering = where_reference(model, ids, actions)
    assert len(entering) == num_layers_of(model)
    assert max_err(logits, hf_logits(model, ids)) == 0.0


# ---- the engine against it -----------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_equals_decode_equals_ragged(arch):
    model = build_model(arch)
    llm = LLM(model)
    L = num_layers_of(model)
    lengths = [37, 1, 7, 20]
    seqs = [random_ids(model, n, seed=200 + n) for n in lengths]
    acts = [random_actions(n, L, seed=300 + n) for n in lengths]
    alone = [llm.score(ids, actions=a) for ids, a in zip(seqs, acts)]
    for ids, a, ref in zip(seqs, acts, alone):
        assert max_err(llm.score(ids, actions=a, chunk_size=1), ref) <= TIGHT
        assert max_err(llm.score(ids, actions=a, chunk_size=4), ref) <= TIGHT
    for chunk_size in (None, 1, 3):
        batch = llm.score(seqs, actions=acts, chunk_size=chunk_size)
        for out, ref in zip(batch, alone):
            assert max_err(out, ref) <= TIGHT
    # The actions matter: the same tokens at full depth give different logits.
    assert max_err(llm.score(seqs[0]), alone[0]) > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk_size", [None, 1])
def test_fixed_actions_match_where_reference(arch, chunk_size):
    model = build_model(arch)
    llm = LLM(model)
    L = num_layers_of(model)
    ids = random_ids(model, 37, seed=3)
    actions = random_actions(37, L, seed=4)
    ref, _ = where_reference(model, ids, actions)
    assert max_err(llm.score(ids, actions=actions, chunk_size=chunk_size), ref) <= HF_TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_actions_accept_lists_and_other_int_dtypes(arch):
    model = build_model(arch)
    llm = LLM(model)
    ids = random_ids(model, 7, seed=8)
    actions = random_actions(7, num_layers_of(model), seed=9)
    ref = llm.score(ids, actions=actions)
    assert max_err(llm.score(ids.tolist(), actions=actions.tolist()), ref) == 0.0
    assert max_err(llm.score(ids, actions=actions.long()), ref) == 0.0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("code", [SKIP, EXIT])
def test_no_layer_run_gives_head_of_embedding(arch, code):
    model = build_model(arch)
    llm = LLM(model)
    L = num_layers_of(model)
    ids = random_ids(model, 7, seed=10)
    actions = torch.full((7, L), code, dtype=torch.int8)
    if code == EXIT:
        actions[:, 1:] = PROCESS    # EXIT at layer 0 is sticky: the PROCESS codes after it are moot
    logits, trace = llm.score(ids, actions=actions, chunk_size=3, return_trace=True)
    assert max_err(logits, head_of_embedding(model, ids)) <= HF_TOL
    skip_cost = llm.weights.skip_cost()
    torch.testing.assert_close(trace.compute, torch.full((7,), skip_cost))
    assert (trace.layers_run == 0).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_exit_is_sticky_and_equals_skipping_the_rest(arch):
    model = build_model(arch)
    llm = LLM(model)
    L = num_layers_of(model)
    T = 9
    ids = random_ids(model, T, seed=12)
    with_exit = torch.zeros(T, L, dtype=torch.int8)
    as_skips = torch.zeros(T, L, dtype=torch.int8)
    for t in range(T):
        e = t % (L + 1)             # token t exits at layer e (e == L: never)
        if e < L:
            with_exit[t, e] = EXIT
            with_exit[t, e + 1:] = torch.tensor([PROCESS, SKIP, EXIT] * L)[: L - e - 1]
            as_skips[t, e:] = SKIP
    logits, trace = llm.score(ids, actions=with_exit, return_trace=True)
    assert max_err(logits, llm.score(ids, actions=as_skips)) <= TIGHT
    # The trace records the canonical form: EXIT at the exit layer and every later one, and the
    # compute of what actually ran.
    for t in range(T):
        e = t % (L + 1)
        assert (trace.actions[t, e:] == EXIT).all()
        assert (trace.actions[t, :e] == PROCESS).all()
        assert int(trace.layers_run[t]) == e
        expected = (e + (L - e) * llm.weights.skip_cost()) / L
        assert float(trace.compute[t]) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_skip_keeps_residual_and_writes_kv_of_norm_h_in(arch):
    """The residual is unchanged across a SKIP/EXIT layer, and the cache holds, for every token at
    every layer, the K/V projection of norm(residual entering the layer), whatever the action."""
    model = build_model(arch)
    llm = LLM(model, block_size=8)
    L = num_layers_of(model)
    T = 37
    ids = random_ids(model, T, seed=14)
    actions = random_actions(T, L, seed=15)
    process = reference_process_mask(actions)
    out, hidden, slots = run_pieces(llm, ids, actions)
    assert len(hidden) == L
    ref_logits, ref_entering = where_reference(model, ids, actions)
    assert max_err(out.logits, ref_logits) <= HF_TOL
    for l in range(L):
        # Our residual entering layer l is the reference's.
        assert max_err(hidden[l], ref_entering[l]) <= HF_TOL
        # Skipped tokens: the residual after layer l is bit-identical to the one before it.
        if l + 1 < L:
            kept = ~process[:, l]
            assert torch.equal(hidden[l + 1][kept], hidden[l][kept])
            assert not torch.equal(hidden[l + 1][~kept], hidden[l][~kept])
        # Every token's K/V at layer l come from norm(h_in) of its own residual.
        k_ref, v_ref = hf_kv_projection(model, l, hidden[l])
        assert max_err(llm.engine.cache.k[l][slots], k_ref) <= TIGHT
        assert max_err(llm.engine.cache.v[l][slots], v_ref) <= TIGHT


@pytest.mark.parametrize("arch", ARCHS)
def test_exit_fills_every_later_layer_from_the_unchanged_residual(arch):
    model = build_model(arch, num_layers=4)
    llm = LLM(model)
    L = 4
    T = 7
    ids = random_ids(model, T, seed=16)
    actions = torch.zeros(T, L, dtype=torch.int8)
    exits = [0, 1, 2, 3, 1, 2, 0]
    for t, e in enumerate(exits):
        actions[t, e] = EXIT
        actions[t, e + 1:] = PROCESS       # ignored after the EXIT
    out, hidden, slots = run_pieces(llm, ids, actions)
    assert max_err(out.logits, where_reference(model, ids, actions)[0]) <= HF_TOL
    for t, e in enumerate(exits):
        h_exit = hidden[e][t:t + 1]
        for l in range(e, L):
            assert torch.equal(hidden[l][t], hidden[e][t])
            k_ref, v_ref = hf_kv_projection(model, l, h_exit, positions=[t])
            assert max_err(llm.engine.cache.k[l][slots[t:t + 1]], k_ref) <= TIGHT
            assert max_err(llm.engine.cache.v[l][slots[t:t + 1]], v_ref) <= TIGHT
    # Later tokens attend to the exited tokens' filled K/V: the same matrix scored token by token
    # (each query reading the cache) gives the same logits.
    assert max_err(llm.score(ids, actions=actions, chunk_size=1), out.logits) <= TIGHT


@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa"])
def test_fixed_trace_compute_formula(arch):
    model = build_model(arch, num_layers=4)
    llm = LLM(model)
    ids = random_ids(model, 37, seed=17)
    actions = random_actions(37, 4, seed=18)
    _, trace = llm.score(ids, actions=actions, chunk_size=5, return_trace=True)
    n_process = reference_process_mask(actions).sum(1).float()
    expected = (n_process + (4 - n_process) * llm.weights.skip_cost()) / 4
    torch.testing.assert_close(trace.compute, expected)
    assert torch.equal(trace.layers_run, n_process.long())
    assert trace.actions.dtype == torch.int8 and trace.actions.shape == (37, 4)
