"""The C++ extension anee_fast._C: it is built and imports, its ops are registered with the
contract's schemas, `torch.library.opcheck` passes (schema, fake impls, dispatch), and its CPU
kernels match reference_ops, down to the bit for cache slots they must not touch. The test
set-up (make test) always builds the extension, so a missing one fails here.
"""

import pytest
import torch

from anee_fast.ops import reference as ref

SENTINEL = -1234.5
SCHEMAS = {
    "norm": "anee_fast::norm(Tensor x, Tensor weight, Tensor? bias, float eps, bool rms) -> Tensor",
    "add_norm": "anee_fast::add_norm(Tensor x, Tensor residual, Tensor weight, Tensor? bias, "
                "float eps, bool rms) -> (Tensor, Tensor)",
    "linear": "anee_fast::linear(Tensor x, Tensor weight, Tensor? bias, str activation=\"none\", "
              "Tensor? residual=None, Tensor? row_mask=None, str weight_format=\"dense\") -> Tensor",
    "skip_kv": "anee_fast::skip_kv(Tensor h, Tensor norm_weight, Tensor? norm_bias, Tensor kv_weight, "
               "Tensor? kv_bias, Tensor positions, Tensor? inv_freq, float rope_scale, "
               "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, float eps, bool rms, "
               "Tensor(c!)? q_out=None, str weight_format=\"dense\") -> ()",
    "skip_adapter": "anee_fast::skip_adapter(Tensor h, Tensor norm_weight, Tensor? norm_bias, "
                    "Tensor down_weight, Tensor up_weight, Tensor? up_bias, Tensor row_mask, "
                    "float eps, bool rms, str weight_format=\"dense\") -> Tensor",
    "paged_attention": "anee_fast::paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, "
                       "Tensor block_tables, Tensor seq_idx, Tensor positions, int block_size, "
                       "float scale, int sliding_window) -> Tensor",
    "policy_step": "anee_fast::policy_step(Tensor proposed, Tensor(a!) spent, Tensor(b!) stopped, "
                   "Tensor allowed, Tensor limit, Tensor(c!) budget_left, Tensor(d!) actions, "
                   "int layer, float commitment, float skip_cost, int stop_code, bool forced) "
                   "-> Tensor",
    "saturation_codes": "anee_fast::saturation_codes(Tensor h, Tensor h_prev, Tensor budget_left, "
                        "float skip_saturation, float exit_saturation, float exit_threshold) -> Tensor",
    "budget_controller": "anee_fast::budget_controller(Tensor h, Tensor h_prev, Tensor budget, "
                         "Tensor budget_left, Tensor scalar_mean, Tensor scalar_std, "
                         "Tensor proj_weight, Tensor inp_weight, Tensor inp_bias, "
                         "Tensor layer_weight, Tensor hidden_weight, Tensor hidden_bias, "
                         "Tensor out_weight, Tensor out_bias, int layer, int num_layers, "
                         "float skip_cost, int order_position, int order_length, float margin, "
                         "float net_min_budget, float net_max_budget, "
                         "float exit_threshold) -> Tensor",
}


@pytest.fixture(scope="module")
def native():
    from anee_fast.ops import native as native_ops      # an ImportError here means the build is missing
    return native_ops


# ---- build and registration ----------------------------------------------------------------------

def test_extension_imports_and_backend_is_available(native):
    import anee_fast._C  # noqa: F401
    from anee_fast import backends
    assert backends()["native"] is True


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_op_registered_with_contract_schema(native, name):
    op = getattr(torch.ops.anee_fast, name)
    assert str(op.default._schema) == SCHEMAS[name]
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"anee_fast::{name}", "CPU")


def test_native_on_cuda_is_available_exactly_when_cuda_kernels_are_built(native):
    from anee_fast import backends
    built = all(torch._C._dispatch_has_kernel_for_dispatch_key(f"anee_fast::{name}", "CUDA")
                for name in SCHEMAS)
    status = backends("cuda")["native"]
    assert native.supports("cuda") == built
    assert status is True if built else "has no cuda kernels" in status


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_cuda_kernels_built_on_a_gpu_machine(native, name):
    # make setup on a machine with a GPU (CUDA torch, nvcc) must build csrc/cuda: the cuda tests
    # of the per-op test files then run these kernels, never a CPU fallback.
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"anee_fast::{name}", "CUDA")


# ---- input builders ------------------------------------------------------------------------------

def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _norm_inputs(g, rows, hidden, rms, with_bias, dtype=torch.float32):
    x = (torch.randn(rows, hidden, generator=g) * 3).to(dtype)
    w = (1 + 0.3 * torch.randn(hidden, generator=g)).to(dtype)
    b = (0.3 * torch.randn(hidden, generator=g)).to(dtype) if with_bias else None
    return x, w, b


def _slots(g, rows, num_slots):
    """Distinct slots (never the spare last one); rows 1, 4, 7, ... are padding (-1)."""
    s = torch.randperm(num_slots - 1, generator=g)[:rows]
    s[1::3] = -1
    return s


def _skip_kv_inputs(g, rows, hidden, kv_heads, d, total_layers, q_size, num_slots, rope, rms,
                    biases, dtype=torch.float32):
    """One layer's inputs as the model runner passes them: kv_weight/kv_bias the K|V rows (views)
    of the layer's K|V|Q kvq_weight/kvq_bias, and the caches layer `lo` of k_all/v_all
    [total_layers, num_slots, kv_heads, d]."""
    kv = 2 * kv_heads * d
    lo = total_layers - 2                            # a layer in the middle of the cache
    h = torch.randn(rows, hidden, generator=g).to(dtype)
    nw = (1 + 0.3 * torch.randn(hidden, generator=g)).to(dtype)
    nb = (0.3 * torch.randn(hidden, generator=g)).to(dtype) if biases else None
    kvq_w = (torch.randn(kv + q_size, hidden, generator=g) / hidden ** 0.5).to(dtype)
    kvq_b = (0.3 * torch.randn(kv + q_size, generator=g)).to(dtype) if biases else None
    positions = torch.randint(0, 300, (rows,), generator=g)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)) if rope else None
    k_all = torch.full((total_layers, num_slots, kv_heads, d), SENTINEL, dtype=dtype)
    v_all = torch.full((total_layers, num_slots, kv_heads, d), SENTINEL, dtype=dtype)
    slots = _slots(g, rows, num_slots)
    return dict(h=h, norm_weight=nw, norm_bias=nb, kv_weight=kvq_w[:kv],
                kv_bias=None if kvq_b is None else kvq_b[:kv], kvq_weight=kvq_w, kvq_bias=kvq_b,
                positions=positions, inv_freq=inv_freq, rope_scale=1.3 if rope else 1.0,
                k_all=k_all, v_all=v_all, lo=lo, slot_mapping=slots, eps=1e-5, rms=rms)


def _run_skip_kv(fn, a, k_all, v_all):
    fn(a["h"], a["norm_weight"], a["norm_bias"], a["kv_weight"], a["kv_bias"], a["positions"],
       a["inv_freq"], a["rope_scale"], k_all[a["lo"]], v_all[a["lo"]], a["slot_mapping"],
       a["eps"], a["rms"])


def _paged_inputs(g, seq_lens, heads, kv_heads, d, block_size, dtype=torch.float32):
    """A cache with shuffled blocks holding several sequences; one query row per (seq, position)
    sample, including each sequence's last position."""
    blocks_per_seq = [(n + block_size - 1) // block_size for n in seq_lens]
    max_blocks = max(blocks_per_seq) + 1
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.long)
    used = 0
    for s, nb in enumerate(blocks_per_seq):
        tables[s, :nb] = perm[used:used + nb]
        tables[s, nb:] = perm[-1]                    # an unused block: valid, never visible
        used += nb
    num_slots = num_blocks * block_size + 1
    k_cache = torch.randn(num_slots, kv_heads, d, generator=g).to(dtype)
    v_cache = torch.randn(num_slots, kv_heads, d, generator=g).to(dtype)
    seq_idx, positions = [], []
    for s, n in enumerate(seq_lens):
        picks = sorted(set(torch.randint(0, n, (3,), generator=g).tolist()) | {0, n - 1})
        seq_idx += [s] * len(picks)
        positions += picks
    q = torch.randn(len(positions), heads, d, generator=g).to(dtype)
    return q, k_cache, v_cache, tables, torch.tensor(seq_idx), torch.tensor(positions)


# ---- opcheck: schema, fake (meta) implementations, dispatch --------------------------------------

def test_opcheck_norm(native):
    g = _gen(0)
    for rms, with_bias in [(True, False), (False, True), (True, True)]:
        x, w, b = _norm_inputs(g, 5, 37, rms, with_bias)
        torch.library.opcheck(torch.ops.anee_fast.norm, (x, w, b, 1e-5, rms))
    x = torch.randn(2, 3, 16, generator=g)
    torch.library.opcheck(torch.ops.anee_fast.norm, (x, torch.randn(16, generator=g), None, 1e-6, True))


def test_opcheck_add_norm(native):
    g = _gen(2)
    for rms, with_bias in [(True, False), (False, True)]:
        x, w, b = _norm_inputs(g, 5, 37, rms, with_bias)
        torch.library.opcheck(torch.ops.anee_fast.add_norm,
                              (x, torch.randn(5, 37, generator=g), w, b, 1e-5, rms))
    x = torch.randn(2, 3, 16, generator=g)
    torch.library.opcheck(torch.ops.anee_fast.add_norm,
                          (x, torch.randn(2, 3, 16, generator=g), torch.randn(16, generator=g), None, 1e-6, True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_add_norm_half_precision(native, dtype):
    x, w, b = _norm_inputs(_gen(7), 9, 83, False, True, dtype)
    residual = torch.randn(9, 83, generator=_gen(8)).to(dtype)
    total, out = native.add_norm(x, residual, w, b, 1e-5, False)
    assert total.dtype == out.dtype == dtype
    assert torch.equal(total, x + residual)
    torch.testing.assert_close(out.float(), ref.norm(x + residual, w, b, 1e-5, False).float(),
                               atol=2e-2, rtol=2e-2)


def test_add_norm_rejects_mismatched_inputs(native):
    x, w = torch.randn(3, 8), torch.randn(8)
    with pytest.raises(RuntimeError, match="differ in shape"):
        native.add_norm(x, torch.randn(3, 7), w, None, 1e-5, True)
    with pytest.raises(RuntimeError, match="same dtype"):
        native.add_norm(x, x.double(), w, None, 1e-5, True)


def test_opcheck_policy_step(native):
    g = _gen(3)
    for forced in (False, True):
        torch.library.opcheck(torch.ops.anee_fast.policy_step, (
            torch.randint(0, 3, (9,), generator=g, dtype=torch.int8), torch.rand(9, generator=g) * 4,
            torch.rand(9, generator=g) < 0.3, torch.rand(9, generator=g) * 6,
            torch.rand(9, generator=g) * 6, torch.zeros(9), torch.zeros(9, 5, dtype=torch.int8),
            2, 1.3, 0.1, 2, forced))


def test_policy_step_rejects_bad_arguments(native):
    args = lambda **kw: {**dict(proposed=torch.zeros(4, dtype=torch.int8), spent=torch.zeros(4),
                                stopped=torch.zeros(4, dtype=torch.bool), allowed=torch.ones(4),
                                limit=torch.ones(4), budget_left=torch.zeros(4),
                                actions=torch.zeros(4, 3, dtype=torch.int8)), **kw}
    call = lambda layer=1, stop_code=2, **kw: native.policy_step(*args(**kw).values(), layer, 1.0, 0.1,
                                                                  stop_code, False)
    with pytest.raises(RuntimeError, match="layer 3 is out of range"):
        call(layer=3)
    with pytest.raises(RuntimeError, match="stop_code must be"):
        call(stop_code=0)
    with pytest.raises(RuntimeError, match="spent must be a contiguous float32"):
        call(spent=torch.zeros(8)[::2])
    with pytest.raises(RuntimeError, match="proposed must be int8"):
        call(proposed=torch.zeros(4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="limit must be float32"):
        call(limit=torch.ones(4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="budget_left must be a contiguous float32"):
        call(budget_left=torch.zeros(8)[::2])


def test_opcheck_linear(native):
    g = _gen(1)
    for rows, bias in [(1, True), (5, False), (17, True)]:     # the GEMV and at::linear sides
        torch.library.opcheck(torch.ops.anee_fast.linear, (
            torch.randn(rows, 37, generator=g), torch.randn(11, 37, generator=g),
            torch.randn(11, generator=g) if bias else None))
    torch.library.opcheck(torch.ops.anee_fast.linear, (
        torch.randn(2, 3, 16, generator=g), torch.randn(9, 16, generator=g), None))
    for rows in (2, 17):                                        # the epilogues: GEMV and at::linear
        torch.library.opcheck(torch.ops.anee_fast.linear, (
            torch.randn(rows, 16, generator=g), torch.randn(12, 16, generator=g), None, "silu_gated",
            torch.randn(rows, 6, generator=g)))
        torch.library.opcheck(torch.ops.anee_fast.linear, (
            torch.randn(rows, 16, generator=g), torch.randn(12, 16, generator=g),
            torch.randn(12, generator=g), "gelu_tanh"))
        torch.library.opcheck(torch.ops.anee_fast.linear, (           # the masked layer loop's
            torch.randn(rows, 16, generator=g), torch.randn(12, 16, generator=g), None, "none",
            torch.randn(rows, 12, generator=g), torch.rand(rows, generator=g) < 0.5))


def test_opcheck_saturation_codes(native):
    g = _gen(2)
    h = torch.randn(5, 24, generator=g)
    torch.library.opcheck(torch.ops.anee_fast.saturation_codes, (
        h, h + 0.1 * torch.randn(5, 24, generator=g), torch.rand(5, generator=g), 0.98, 0.995, 0.1))


def test_opcheck_budget_controller(native):
    g = _gen(3)
    h = torch.randn(5, 24, generator=g)
    net = [torch.randn(*shape, generator=g) for shape in
           ((8,), (8,), (3, 24), (7, 11), (7,), (6, 7), (7, 7), (7,), (1, 7), (1,))]
    torch.library.opcheck(torch.ops.anee_fast.budget_controller, (
        h, h + 0.1 * torch.randn(5, 24, generator=g), torch.rand(5, generator=g),
        torch.rand(5, generator=g), *net, 2, 6, 0.2, 1, 4, 0.5, 0.4, 0.8, 0.1))


@pytest.mark.parametrize("rope,rms,biases", [(True, True, False), (False, False, True)])
def test_opcheck_skip_kv(native, rope, rms, biases):
    a = _skip_kv_inputs(_gen(2), rows=6, hidden=24, kv_heads=2, d=8, total_layers=4, q_size=24,
                        num_slots=33, rope=rope, rms=rms, biases=biases)
    lo = a["lo"]
    torch.library.opcheck(torch.ops.anee_fast.skip_kv, (
        a["h"], a["norm_weight"], a["norm_bias"], a["kv_weight"], a["kv_bias"], a["positions"],
        a["inv_freq"], a["rope_scale"], a["k_all"][lo], a["v_all"][lo], a["slot_mapping"],
        a["eps"], a["rms"]))


def test_opcheck_skip_kv_with_q_out(native):
    """q_out (a mutated optional argument): weights that hold K|V|Q."""
    a = _skip_kv_inputs(_gen(6), rows=6, hidden=24, kv_heads=2, d=8, total_layers=3, q_size=24,
                        num_slots=33, rope=True, rms=True, biases=True)
    lo = a["lo"]
    q_out = torch.full((6, 3, 8), float("nan"))
    torch.library.opcheck(torch.ops.anee_fast.skip_kv, (
        a["h"], a["norm_weight"], a["norm_bias"], a["kvq_weight"], a["kvq_bias"], a["positions"],
        a["inv_freq"], a["rope_scale"], a["k_all"][lo], a["v_all"][lo], a["slot_mapping"],
        a["eps"], a["rms"], q_out))


@pytest.mark.parametrize("rows,rms,biases", [(5, True, False), (30, False, True)])   # GEMV, GEMM
def test_opcheck_skip_adapter(native, rows, rms, biases):
    g = _gen(rows)
    x, w, b = _norm_inputs(g, rows, 24, rms, biases)
    torch.library.opcheck(torch.ops.anee_fast.skip_adapter, (
        x, w, b, torch.randn(6, 24, generator=g), torch.randn(24, 6, generator=g),
        torch.randn(24, generator=g) if biases else None, torch.arange(rows) % 5 != 4, 1e-5, rms))


@pytest.mark.parametrize("window", [0, 3])
def test_opcheck_paged_attention(native, window):
    q, kc, vc, tables, seq_idx, positions = _paged_inputs(_gen(3), [5, 11], 4, 2, 8, 4)
    torch.library.opcheck(torch.ops.anee_fast.paged_attention,
                          (q, kc, vc, tables, seq_idx, positions, 4, 0.35, window))


def test_torch_compile_traces_the_ops(native):
    """fullgraph tracing through the fake impls (aot_eager: no C++ compiler in the loop)."""
    a = _skip_kv_inputs(_gen(4), rows=5, hidden=24, kv_heads=2, d=8, total_layers=3, q_size=24,
                        num_slots=41, rope=True, rms=True, biases=False)
    k_cache, v_cache = a["k_all"][a["lo"]], a["v_all"][a["lo"]]
    tables = torch.arange(10).reshape(1, 10)
    seq_idx = torch.zeros(5, dtype=torch.long)
    positions = torch.arange(5)
    slots = torch.arange(5)

    def step(h, q):
        x = native.norm(h, a["norm_weight"], None, 1e-5, True)
        native.skip_kv(x, a["norm_weight"], None, a["kv_weight"], None, positions, a["inv_freq"], 1.0,
                       k_cache, v_cache, slots, 1e-5, True)
        return native.paged_attention(q, k_cache, v_cache, tables, seq_idx, positions, 4, 0.3, 0)

    q = torch.randn(5, 4, 8)
    eager = step(a["h"], q)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(a["h"], q)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


# ---- against the reference -----------------------------------------------------------------------

@pytest.mark.parametrize("rows,hidden", [(1, 48), (7, 83), (83, 576)])
@pytest.mark.parametrize("rms,with_bias", [(True, False), (False, True), (True, True)])
def test_norm_matches_reference(native, rows, hidden, rms, with_bias):
    x, w, b = _norm_inputs(_gen(rows * hidden), rows, hidden, rms, with_bias)
    torch.testing.assert_close(native.norm(x, w, b, 1e-5, rms), ref.norm(x, w, b, 1e-5, rms),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norm_half_precision(native, dtype):
    x, w, b = _norm_inputs(_gen(5), 9, 83, False, True, dtype)
    out = native.norm(x, w, b, 1e-5, False)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.norm(x, w, b, 1e-5, False).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_linear_other_dtypes(native, dtype):
    g = _gen(6)
    x, w, b = (torch.randn(*shape, generator=g).to(dtype) for shape in ((3, 83), (29, 83), (29,)))
    out = native.linear(x, w, b)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref.linear(x, w, b))


SKIP_KV_CASES = [  # rows, hidden, kv_heads, d, rope, rms, biases
    (1, 48, 2, 64, True, True, False),
    (7, 83, 3, 80, True, True, True),
    (13, 96, 2, 64, False, False, True),      # GPT-2 style: LayerNorm, biases, no RoPE
    (29, 64, 1, 80, True, True, False),
    (5, 40, 3, 64, False, False, True),
]


@pytest.mark.parametrize("rows,hidden,kv_heads,d,rope,rms,biases", SKIP_KV_CASES)
def test_skip_kv_matches_reference(native, rows, hidden, kv_heads, d, rope, rms, biases):
    a = _skip_kv_inputs(_gen(rows * 31 + d), rows, hidden, kv_heads, d, total_layers=3,
                        q_size=hidden, num_slots=8 * 16 + 1, rope=rope, rms=rms, biases=biases)
    k_ref, v_ref = a["k_all"].clone(), a["v_all"].clone()
    _run_skip_kv(ref.skip_kv, a, k_ref, v_ref)
    k_ref[:, -1] = SENTINEL                         # the reference parks padding rows' writes there
    v_ref[:, -1] = SENTINEL
    weight_before = a["kv_weight"].clone()
    _run_skip_kv(native.skip_kv, a, a["k_all"], a["v_all"])
    assert torch.equal(a["kv_weight"], weight_before)

    # Which (layer, slot) pairs must have been written.
    written = torch.zeros(a["k_all"].shape[:2], dtype=torch.bool)
    slots = a["slot_mapping"]
    written[a["lo"], slots[slots >= 0]] = True
    untouched = ~written
    assert torch.equal(a["k_all"][untouched], torch.full_like(a["k_all"][untouched], SENTINEL))
    assert torch.equal(a["v_all"][untouched], torch.full_like(a["v_all"][untouched], SENTINEL))
    assert written.any()
    torch.testing.assert_close(a["k_all"][written], k_ref[written], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["v_all"][written], v_ref[written], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["k_all"], k_ref, atol=1e-5, rtol=1e-5)


def test_skip_kv_bf16(native):
    a = _skip_kv_inputs(_gen(11), 9, 64, 2, 64, total_layers=4, q_size=64, num_slots=65, rope=True,
                        rms=True, biases=False, dtype=torch.bfloat16)
    k_ref, v_ref = a["k_all"].clone(), a["v_all"].clone()
    _run_skip_kv(ref.skip_kv, a, k_ref, v_ref)
    k_ref[:, -1] = SENTINEL
    v_ref[:, -1] = SENTINEL
    _run_skip_kv(native.skip_kv, a, a["k_all"], a["v_all"])
    torch.testing.assert_close(a["k_all"].float(), k_ref.float(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(a["v_all"].float(), v_ref.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("heads,kv_heads,d", [(6, 2, 64), (6, 3, 80), (4, 4, 64), (9, 3, 80)])
@pytest.mark.parametrize("window", [0, 5])
def test_paged_attention_matches_reference(native, block_size, heads, kv_heads, d, window):
    g = _gen(block_size * 100 + heads * 10 + d + window)
    q, kc, vc, tables, seq_idx, positions = _paged_inputs(g, [1, 7, 83, 40], heads, kv_heads, d,
                                                          block_size)
    scale = d ** -0.5
    out = native.paged_attention(q, kc, vc, tables, seq_idx, positions, block_size, scale, window)
    expect = ref.paged_attention(q, kc, vc, tables, seq_idx, positions, block_size, scale, window)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)


def test_paged_attention_strided_caches(native):
    """Caches that are views: one layer of a stacked cache, and a layout with head_dim strided."""
    q, kc, vc, tables, seq_idx, positions = _paged_inputs(_gen(13), [9, 30], 6, 3, 16, 8)
    stacked_k = torch.randn(3, *kc.shape)
    stacked_k[1] = kc
    odd_v = vc.transpose(1, 2).contiguous().transpose(1, 2)     # [slots, kv_heads, d], d-stride 3
    assert not odd_v.is_contiguous()
    out = native.paged_attention(q, stacked_k[1], odd_v, tables, seq_idx, positions, 8, 0.25, 0)
    expect = ref.paged_attention(q, kc, vc, tables, seq_idx, positions, 8, 0.25, 0)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)


def test_paged_attention_bf16(native):
    q, kc, vc, tables, seq_idx, positions = _paged_inputs(_gen(12), [9, 30], 6, 2, 64, 8, torch.bfloat16)
    out = native.paged_attention(q, kc, vc, tables, seq_idx, positions, 8, 0.125, 0)
    expect = ref.paged_attention(q, kc, vc, tables, seq_idx, positions, 8, 0.125, 0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expect.float(), atol=3e-2, rtol=3e-2)


def test_bad_slot_is_an_error_not_a_crash(native):
    a = _skip_kv_inputs(_gen(15), rows=2, hidden=24, kv_heads=1, d=8, total_layers=3, q_size=0,
                        num_slots=9, rope=False, rms=True, biases=False)
    with pytest.raises(RuntimeError, match="out of range"):
        _run_skip_kv(native.skip_kv, {**a, "slot_mapping": torch.tensor([0, 9])}, a["k_all"], a["v_all"])


# ---- end to end ----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama_gqa", "gpt2", "llama_variants", "mistral_window"])
def test_llm_score_native_equals_reference(native, arch):
    from anee_fast import LLM
    from conftest import build_model, num_layers_of, random_actions, random_ids
    model = build_model(arch)
    ids = random_ids(model, 23, seed=1)
    actions = random_actions(23, num_layers_of(model), seed=2)
    ref_llm, nat_llm = LLM(model, backend="reference"), LLM(model, backend="native")
    for kwargs in (dict(), dict(actions=actions), dict(actions=actions, chunk_size=5)):
        torch.testing.assert_close(nat_llm.score(ids, **kwargs), ref_llm.score(ids, **kwargs),
                                   atol=1e-4, rtol=1e-4)
