"""Collective counting on hand-written HLO text: loop trip counts, tuples, async starts."""

from self_flow import hlo_collectives

HLO = """\
HloModule jit_train_step, entry_computation_layout={()->f32[]}

%add (lhs: f32[], rhs: f32[]) -> f32[] {
  %lhs = f32[] parameter(0)
  %rhs = f32[] parameter(1)
  ROOT %sum = f32[] add(f32[] %lhs, f32[] %rhs)
}

%cond (p: (s32[], bf16[8,16])) -> pred[] {
  %p = (s32[], bf16[8,16]{1,0}) parameter(0)
  %limit = s32[]{:T(128)} constant(6)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %limit), direction=LT
}

%inner_fusion (x: bf16[2,16]) -> bf16[8,16] {
  %x = bf16[2,16]{1,0} parameter(0)
  ROOT %ag = bf16[8,16]{1,0:T(8,128)(2,1)} all-gather(%x), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}
}

%body (p: (s32[], bf16[8,16])) -> (s32[], bf16[8,16]) {
  %p = (s32[], bf16[8,16]{1,0}) parameter(0)
  %w = bf16[2,16]{1,0} parameter(1)
  %gathered = bf16[8,16]{1,0} fusion(%w), kind=kCustom, calls=%inner_fusion
  %kernel = bf16[2,16]{1,0} custom-call(%w), custom_call_target="tpu_custom_call", backend_config={"custom_call_config": {"body": "abc",
"xprof_metadata":"{\"block_q\": 128}"
}}, metadata={op_name="pallas_call"}
  %perm = (f32[4], f32[4], u32[], u32[]) collective-permute-start(%w), source_target_pairs={{0,1}}
  ROOT %t = (s32[], bf16[8,16]) tuple(%p, %gathered)
}

%loop_cond_unknown (q: s32[]) -> pred[] {
  %q = s32[] parameter(0)
  ROOT %ne = pred[] compare(%q, %q), direction=NE
}

ENTRY %main (a: f32[1024], b: f32[32,32]) -> f32[] {
  %a = f32[1024]{0} parameter(0)
  %b = f32[32,32]{1,0} parameter(1)
  %ar = (f32[1024]{0}, /*index=1*/f32[32,32]{1,0}) all-reduce(%a, %b), replica_groups={}, to_apply=%add
  %init = (s32[], bf16[8,16]) tuple()
  %loop = (s32[], bf16[8,16]) while(%init), condition=%cond, body=%body, metadata={op_name="x"}
  %other = (s32[], bf16[8,16]) while(%init), condition=%loop_cond_unknown, body=%body
  ROOT %r = f32[] constant(0)
}
"""


def test_counts_loop_iterations_tuples_and_async_starts():
  report = hlo_collectives.count(HLO)
  # One variadic all-reduce in the entry: 1024 + 32 * 32 floats.
  assert report.by_kind["all-reduce"] == hlo_collectives.Collective(1, 1, 4 * 2048)
  # The all-gather lives in a fusion of a loop body run 6 times, plus once by the loop whose
  # trip count is unreadable: one instruction, 7 executions of 8 * 16 bf16.
  assert report.by_kind["all-gather"] == hlo_collectives.Collective(1, 7, 7 * 8 * 16 * 2)
  # An async start counts its largest buffer (the f32[4] output), not the context scalars.
  assert report.by_kind["collective-permute"] == hlo_collectives.Collective(1, 7, 7 * 16)
  assert report.unknown_trip_counts == 1
  assert report.total_bytes == 8192 + 7 * 256 + 7 * 16


def test_no_collectives_and_missing_entry():
  assert hlo_collectives.count("ENTRY %main () -> f32[] {\n  ROOT %c = f32[] constant(1)\n}"
                               ).by_kind == {}
  try:
    hlo_collectives.count("%f () -> f32[] {\n}")
  except ValueError as err:
    assert "ENTRY" in str(err)
  else:
    raise AssertionError("HLO without an entry computation was accepted")


COST_HLO = """\
HloModule jit_train_step

%cond (p: (s32[], f32[8,32])) -> pred[] {
  %p = (s32[], f32[8,32]{1,0}) parameter(0)
  %limit = s32[] constant(6)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %limit), direction=LT
}

%fused_dot (a: f32[8,16], b: f32[16,32]) -> f32[8,32] {
  %a = f32[8,16]{1,0} parameter(0)
  %b = f32[16,32]{1,0} parameter(1)
  ROOT %d = f32[8,32]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (p: (s32[], f32[8,32])) -> (s32[], f32[8,32]) {
  %p = (s32[], f32[8,32]{1,0}) parameter(0)
  %x = f32[8,16]{1,0} parameter(1)
  %w = f32[16,32]{1,0:S(1)} parameter(2)
  %f = f32[8,32]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_dot
  ROOT %t = (s32[], f32[8,32]) tuple(%p, %f)
}

ENTRY %main (l: f32[4,2,3], k: f32[2,3,5]) -> f32[4,3,5] {
  %l = f32[4,2,3]{2,1,0} parameter(0)
  %k = f32[2,3,5]{2,1,0} parameter(1)
  %init = (s32[], f32[8,32]) tuple()
  %loop = (s32[], f32[8,32]) while(%init), condition=%cond, body=%body
  ROOT %conv = f32[4,3,5]{2,1,0} convolution(%l, %k), window={size=2 pad=1_1}, dim_labels=b0f_0io->b0f
}
"""


def test_cost_counts_loops_padded_windows_and_hbm_traffic():
  """The loop's dot runs 6 times: 2 x 8 x 32 x 16 = 8192 FLOPs each. The convolution's window of
  2 over 2 input positions padded by 1 each side makes 3 outputs from 4 in-bounds (output,
  tap) pairs: 2 x batch 4 x 5 out x 3 in x 4 = 480 FLOPs (the padded taps do no work). HBM
  traffic: the fusion reads x (512 B) and writes its result (1024 B), the weight sits in fast
  memory S(1); the convolution reads 96 + 120 B and writes 240 B."""
  cost = hlo_collectives.cost(COST_HLO)
  assert cost.flops == 6 * 8192 + 480
  assert cost.hbm_bytes == 6 * (512 + 1024) + (96 + 120 + 240)
  assert cost.unknown_trip_counts == 0


def test_trip_count_follows_the_counter_step_of_an_unrolled_loop():
  """A loop body that adds 2 to its counter (the TPU compiler's collective matmul does two steps
  per iteration) runs limit / 2 times: its collectives and dots count 4 times, not 8."""
  hlo = HLO.replace("constant(6)", "constant(8)").replace(
      "  ROOT %t = (s32[], bf16[8,16]) tuple(%p, %gathered)",
      "  %two = s32[] constant(2)\n  %c = s32[] get-tuple-element(%p), index=0\n"
      "  %next = s32[] add(%c, %two)\n  ROOT %t = (s32[], bf16[8,16]) tuple(%next, %gathered)")
  report = hlo_collectives.count(hlo)
  # 4 iterations of the readable loop, plus once for the loop whose trip count is unreadable.
  assert report.by_kind["all-gather"].executions == 4 + 1


def test_trip_count_xla_wrote_into_the_backend_config_is_taken():
  """XLA:CPU compares the counter inside a fusion, which the condition reader does not follow,
  but it writes the proven trip count into the loop's backend config."""
  hlo = HLO.replace(
      "%other = (s32[], bf16[8,16]) while(%init), condition=%loop_cond_unknown, body=%body",
      "%other = (s32[], bf16[8,16]) while(%init), condition=%loop_cond_unknown, body=%body, "
      'backend_config={"known_induction_variable":{"tuple_index":"0"},'
      '"known_trip_count":{"n":"3"}}')
  report = hlo_collectives.count(hlo)
  assert report.unknown_trip_counts == 0
  assert report.by_kind["all-gather"].executions == 6 + 3


def test_a_multi_output_fusion_updating_stacked_buffers_writes_only_the_updates():
  """A scan saves each layer's activations into stacked buffers, several in one fusion whose
  root is a tuple of dynamic-update-slices: each output writes its (1, 4, 8) f32 update (128 B),
  not the (20, 4, 8) buffer, and the buffers are not read; the plain third output (64 B) is
  written whole; the update operands (128 B each) and the index (4 B) are read."""
  hlo = """\
HloModule jit_train_step

%stack (buf0: f32[20,4,8], buf1: f32[20,4,8], u: f32[1,4,8], i: s32[]) -> (f32[20,4,8], f32[20,4,8], f32[16]) {
  %buf0 = f32[20,4,8]{2,1,0} parameter(0)
  %buf1 = f32[20,4,8]{2,1,0} parameter(1)
  %u = f32[1,4,8]{2,1,0} parameter(2)
  %i = s32[] parameter(3)
  %z = s32[] constant(0)
  %d0 = f32[20,4,8]{2,1,0} dynamic-update-slice(%buf0, %u, %i, %z, %z)
  %n = f32[1,4,8]{2,1,0} negate(%u)
  %d1 = f32[20,4,8]{2,1,0} dynamic-update-slice(%buf1, %n, %i, %z, %z)
  %b1 = f32[20,4,8]{2,1,0} bitcast(%d1)
  %r = f32[16]{0} reshape(%n)
  ROOT %t = (f32[20,4,8]{2,1,0}, f32[20,4,8]{2,1,0}, f32[16]{0}) tuple(%d0, %b1, %r)
}

ENTRY %main (a: f32[20,4,8], b: f32[20,4,8], u: f32[1,4,8], i: s32[]) -> f32[] {
  %a = f32[20,4,8]{2,1,0} parameter(0)
  %b = f32[20,4,8]{2,1,0} parameter(1)
  %u = f32[1,4,8]{2,1,0} parameter(2)
  %i = s32[] parameter(3)
  %f = (f32[20,4,8]{2,1,0}, f32[20,4,8]{2,1,0}, f32[16]{0}) fusion(%a, %b, %u, %i), kind=kLoop, calls=%stack
  ROOT %r = f32[] constant(0)
}
"""
  assert hlo_collectives.cost(hlo).hbm_bytes == (128 + 128 + 64) + (128 + 4)


def test_async_copies_count_their_read_and_destination_and_done_ops_nothing():
  """A prefetch into fast memory (copy-start to S(1)) reads its 4 KiB operand from HBM and
  writes nothing there (its result tuple's second array is the source, not a write); a copy back
  to HBM writes its 4 KiB destination; the -done halves and a collective's done move nothing
  (the collective is priced as communication)."""
  hlo = """\
HloModule jit_train_step

ENTRY %main (w: bf16[32,64]) -> bf16[32,64] {
  %w = bf16[32,64]{1,0} parameter(0)
  %in = (bf16[32,64]{1,0:S(1)}, bf16[32,64]{1,0}, u32[]{:S(2)}) copy-start(%w)
  %fast = bf16[32,64]{1,0:S(1)} copy-done(%in)
  %out = (bf16[32,64]{1,0}, bf16[32,64]{1,0:S(1)}, u32[]{:S(2)}) copy-start(%fast)
  %back = bf16[32,64]{1,0} copy-done(%out)
  %p = (bf16[32,64]{1,0}, bf16[32,64]{1,0}) collective-permute-start(%back), source_target_pairs={{0,1}}
  ROOT %r = bf16[32,64]{1,0} collective-permute-done(%p)
}
"""
  assert hlo_collectives.cost(hlo).hbm_bytes == 4096 + 4096
