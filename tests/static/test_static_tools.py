"""The static tooling's parsers and model on small known inputs (no compiler needed): a ptxas -v log,
an nvdisasm listing with nested loops, trip counts from loop headers, and the issue-rate model."""

from __future__ import annotations

import pytest

from static import perf_model, sass, triton_cases
from static.toolchain import blocks_per_sm, parse_ptxas_log

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fwdILi16EEvv' for 'sm_90'
ptxas info    : Function properties for _Z3fwdILi16EEvv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 19584 bytes smem, 1088 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3bwdILi16EEvv' for 'sm_90'
ptxas info    : Function properties for _Z3bwdILi16EEvv
    256 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 167 registers, used 1 barriers, 20672 bytes smem, 1152 bytes cmem[0]
"""


def test_ptxas_log_gives_one_entry_per_kernel():
    fwd, bwd = parse_ptxas_log(PTXAS_LOG)
    assert (fwd.mangled, fwd.arch, fwd.regs, fwd.stack, fwd.spill_stores, fwd.smem, fwd.cmem0) == (
        "_Z3fwdILi16EEvv", "sm_90", 96, 0, 0, 19584, 1088)
    assert (bwd.regs, bwd.stack, bwd.spill_stores, bwd.spill_loads, bwd.smem) == (167, 256, 8, 4, 20672)


def _listing():
    # An outer loop (header k.py:10) around an inner loop (k.py:20), then EXIT and the trap self-branch.
    body = ['\t.section\t.text.kern,"ax",@progbits', "kern:"]
    pc = 0

    def ins(text, line=None):
        nonlocal pc
        if line:
            body.append(f'\t//## File "/src/k.py", line {line}')
        body.append(f"        /*{pc:04x}*/                   {text} ;")
        pc += 16

    ins("MOV R1, c[0x0][0x28]", 1)
    body.append(".L_x_0:")
    ins("LDG.E R2, desc[UR4][R4.64]", 11)
    body.append(".L_x_1:")
    ins("FFMA R3, R2, R2, R3", 21)
    ins("MUFU.EX2 R5, R3")
    ins("@P0 BRA `(.L_x_1)", 20)
    ins("STG.E desc[UR4][R6.64], R3", 12)
    ins("@P1 BRA `(.L_x_0)", 10)
    ins("EXIT", 30)
    body.append(".L_x_2:")
    ins("BRA `(.L_x_2)")
    return "\n".join(body)


def test_sass_loops_nesting_counts_and_headers():
    (fn,) = sass.parse(_listing())
    assert fn.name == "kern" and len(fn.instructions) == 9
    outer, inner = fn.loops  # the trap after EXIT is not a loop
    assert (outer.depth, outer.innermost, outer.instructions) == (0, False, 6)
    assert (inner.depth, inner.innermost, inner.instructions) == (1, True, 3)
    assert inner.classes["fma"] == 1 and inner.classes["mufu"] == 1 and outer.classes["global_ld"] == 1
    assert outer.classes["global_st"] == 1
    assert (outer.branch_line, inner.branch_line) == (("k.py", 10), ("k.py", 20))


class _Lines(perf_model.SourceLines):
    def __init__(self, text):  # noqa: D107 - a fake source folder
        self._text = text

    def line(self, where):
        return self._text[where[1]]

    def text(self, name):
        return None


def test_dynamic_instructions_multiply_nested_trips():
    (fn,) = sass.parse(_listing())
    lines = _Lines({10: "for c in range(0, n_chunks):", 20: "for t in range(t_start, t_end):"})
    rules = [perf_model.TripRule(r"range\(0, n_chunks\)", "n_chunks"),
             perf_model.TripRule(r"range\(t_start, t_end\)", "chunk")]
    total, rows = perf_model.dynamic_instructions(fn, rules, {"n_chunks": 4, "chunk": 64}, lines)
    # straight line 3 (MOV, EXIT, trap) + outer own 3 x 4 + inner 3 x 4 x 64
    assert total == 3 + 3 * 4 + 3 * 256
    assert [r["iterations"] for r in rows] == [4, 256]


def test_a_loop_without_a_rule_is_refused():
    (fn,) = sass.parse(_listing())
    lines = _Lines({10: "for c in range(0, n_chunks):", 20: "for q in something_new():"})
    with pytest.raises(perf_model.ModelError, match="no trip rule"):
        perf_model.dynamic_instructions(fn, [perf_model.TripRule(r"n_chunks", "2")], {}, lines)


def test_predicted_time_scales_with_work_and_occupancy():
    work = perf_model.KernelWork("x", "k", "fwd", blocks=132 * 8, threads=128, warp_instr=1e9, bytes=0, regs=64,
                                 smem=0)
    base = perf_model.predict(work)
    double = perf_model.predict(perf_model.KernelWork(**{**work.__dict__, "warp_instr": 2e9}))
    assert double.ms[0] == pytest.approx(2 * base.ms[0]) and base.ms[0] < base.ms[1]
    starved = perf_model.predict(perf_model.KernelWork(**{**work.__dict__, "regs": 255}))
    assert starved.blocks_per_sm < base.blocks_per_sm and starved.ms[0] > base.ms[0]
    # 1e9 warp-instructions at 4 x 132 x 1.98e9 per second and 75 % efficiency: 1.275 ms
    assert base.ms[0] == pytest.approx(1e9 / (4 * 132 * 1.98e9) / 0.75 * 1e3, rel=1e-6)
    memory_bound = perf_model.predict(perf_model.KernelWork(**{**work.__dict__, "bytes": 43e9}))
    assert memory_bound.ms == pytest.approx((10.0, 10.0))


def test_under_filled_wave_is_charged_once():
    """Empty resident slots cost nothing by themselves: 3 blocks per SM take the same time whether 3 or
    7 fit, and a grid smaller than the GPU runs each block at the one-block, latency-bound rate."""
    work = perf_model.KernelWork("x", "k", "bwd", blocks=132 * 3, threads=128, warp_instr=132 * 3 * 1e6, bytes=0,
                                 regs=168, smem=0)  # 3 blocks fit per SM
    roomy = perf_model.KernelWork(**{**work.__dict__, "regs": 64})  # 8 fit
    assert perf_model.predict(roomy).blocks_per_sm > perf_model.predict(work).blocks_per_sm
    assert perf_model.predict(roomy).ms == pytest.approx(perf_model.predict(work).ms)
    # 3 blocks of 4 warps: 3 warps per scheduler, 3/4 of the latency hidden.
    rate = 4 * 1.98e9
    assert perf_model.predict(work).ms[0] == pytest.approx(3 * 1e6 / (rate * 0.75 * 0.75) * 1e3)
    small = perf_model.KernelWork(**{**work.__dict__, "blocks": 100, "warp_instr": 100 * 1e6})
    one = perf_model.KernelWork(**{**work.__dict__, "blocks": 132, "warp_instr": 132 * 1e6})
    assert perf_model.predict(small).ms == pytest.approx(perf_model.predict(one).ms)
    # Two rounds of 3 then a remainder of 1 block at a quarter of the occupancy.
    seven = perf_model.KernelWork(**{**work.__dict__, "blocks": 132 * 7, "warp_instr": 132 * 7 * 1e6})
    expect = (2 * 3 * 1e6 / (rate * 0.75 * 0.75) + 1e6 / (rate * 0.75 * 0.25)) * 1e3
    assert perf_model.predict(seven).ms[0] == pytest.approx(expect)


def test_occupancy_rules():
    assert blocks_per_sm(90, 128, 64, 0) == 8  # 64 regs x 128 threads: 8 blocks fill 64K registers
    assert blocks_per_sm(90, 128, 255, 0) == 2
    assert blocks_per_sm(90, 128, 32, 100 * 1024) == 2  # 2 x (100 KiB + 1 KiB) <= 228 KiB
    assert blocks_per_sm(80, 128, 32, 100 * 1024) == 1


def test_padding_classes_group_sizes_that_differ_only_in_n():
    from static.triton_aot import Launch

    cases = {f"c{n}": triton_cases.Case("op", n, "bfloat16", (), call=None) for n in (3, 4, 5, 8, 9)}

    def launch(n):
        npad = 1 << (n - 1).bit_length()
        return Launch("m.k", key=n, constants={"N": n, "NP": npad, "HAS_Z": True}, grid=(1,), num_warps=4,
                      num_stages=3, case=f"c{n}")

    classes = triton_cases.padding_classes([launch(n) for n in (3, 4, 5, 8, 9)], cases)
    sizes = sorted([cases[la.case].N for la in members] for members in classes.values())
    assert sizes == [[3, 4], [5, 8], [9]]
    ends = triton_cases.class_ends(classes, cases)
    assert sorted(cases[la.case].N for la in ends) == [3, 4, 5, 8, 9]


def test_padding_classes_ignore_the_states_per_split():
    """With KS state splits a kernel takes N_PER = ceil(N / KS) as the state loop's bound: sizes that
    differ only in N and N_PER share a class, a different KS (other tile shapes) is another one."""
    from static.triton_aot import Launch

    sizes = (1, 16, 17, 32, 33, 64, 65, 128)
    cases = {f"c{n}": triton_cases.Case("op", n, "bfloat16", (), call=None) for n in sizes}

    def launch(n):
        ks = 1 if n <= 32 else 2 if n <= 64 else 4
        return Launch("m.k", key=n, constants={"N": n, "KS": ks, "N_PER": -(-n // ks), "BLOCK_D": 64},
                      grid=(1,), num_warps=ks, num_stages=3, case=f"c{n}")

    group = [launch(n) for n in sizes]
    assert triton_cases.state_count_constexprs(group, cases) == {"N", "N_PER"}
    classes = triton_cases.padding_classes(group, cases)
    assert sorted([cases[la.case].N for la in m] for m in classes.values()) == [[1, 16, 17, 32], [33, 64], [65, 128]]
    ends = triton_cases.class_ends(classes, cases)
    assert sorted(cases[la.case].N for la in ends) == [1, 32, 33, 64, 65, 128]


def test_versions_of_one_source_loop_count_once():
    """Two sibling loops with the same header (an unswitched loop): only the larger one runs."""
    text = "\n".join([
        '\t.section\t.text.kern,"ax",@progbits', "kern:",
        ".L_x_0:", '\t//## File "/src/k.py", line 7', "        /*0000*/                   FADD R1, R1, R2 ;",
        "        /*0010*/              @P0 BRA `(.L_x_0) ;",
        ".L_x_1:", "        /*0020*/                   FADD R1, R1, R2 ;", "        /*0030*/                   FMUL R1, R1, R2 ;",
        "        /*0040*/              @P0 BRA `(.L_x_1) ;",
        "        /*0050*/                   EXIT ;",
    ])
    (fn,) = sass.parse(text)
    total, rows = perf_model.dynamic_instructions(fn, [perf_model.TripRule("range", "10")], {},
                                                  _Lines({7: "for t in range(L):"}))
    assert total == 1 + 3 * 10 and [r["iterations"] for r in rows] == [0, 10]


def test_report_joins_gpu_measurements_by_shape_backend_n_dtype(tmp_path):
    import static_report

    (tmp_path / "selective_scan.csv").write_text(
        "device,backend,batch,dim,seqlen,N,dtype,fwd_ms,fwd_bwd_ms\n"
        "AMD EPYC (2 threads),triton,8,3072,2048,16,bfloat16,1.0,2.0\n"  # a CPU row: never joined
        "NVIDIA H200,triton,8,3072,2048,16,bfloat16,3.0,12.0\n"
        "NVIDIA H200,cuda,8,3072,2048,16,bfloat16,2.0,8.0\n")
    row = dict(section="scan fwd+bwd", backend="triton", batch=8, dim=3072, seqlen=2048, N=16, dtype="bfloat16",
               pred_ms=10.0, measured_ms="")
    other = dict(row, N=128)
    static_report.join_measured([row, other], tmp_path)
    assert (row["measured_ms"], row["measured_device"], row["measured_over_pred"]) == (12.0, "NVIDIA H200", 1.2)
    assert other["measured_ms"] == ""


def test_triton_range_loops_are_counted_from_the_kernel_source(tmp_path):
    """A loop no rule names: its bounds are replayed from the kernel's scalar assignments."""
    (tmp_path / "k.py").write_text(
        "def kern(x_ptr, n_chunks, chunks_per_split):\n"
        "    pid_s = tl.program_id(2)\n"
        "    offs = tl.arange(0, 16)\n"
        "    c0 = pid_s * chunks_per_split\n"
        "    c1 = tl.minimum(c0 + chunks_per_split, n_chunks)\n"
        "    for c in range(c0, c1):\n"
        "        pass\n"
        "    for n in range(0, 2 * n_chunks, 4):\n")
    lines = perf_model.SourceLines([tmp_path])
    consts = {"n_chunks": 10, "chunks_per_split": 4}
    assert perf_model.python_range_trips(lines, ("k.py", 6), consts) == 4
    assert perf_model.python_range_trips(lines, ("k.py", 8), consts) == 5
    assert perf_model.python_range_trips(lines, ("k.py", 6), {"n_chunks": 3, "chunks_per_split": 4}) == 3
    assert perf_model.python_range_trips(lines, ("k.py", 2), consts) is None  # not a loop
