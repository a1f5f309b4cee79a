"""Collectives of a compiled (SPMD-partitioned, per-device) HLO program, counted per step.

`compiled.as_text()` lists each collective instruction once, but one inside a while loop (every
scanned block segment, the microbatch loop) runs once per iteration, so this module walks the
call graph from the entry computation and multiplies by loop trip counts. A trip count is read
from the loop condition (`compare(counter, constant(N)), direction=LT`, the form `lax.scan` and
`fori_loop` compile to); a loop whose condition has another form counts once and is reported in
`unknown_trip_counts`. Bytes are those of each instruction's result on one device: what that
device receives (for an all-reduce, the reduced buffer; for an all-gather, the gathered one).

The text format is XLA's HLO printer output, which is stable in the parts read here
(`%name = type opcode(operands), attr=...`; a computation ends at a line holding only `}`, since
a Mosaic kernel's custom call prints its configuration over several lines). TPU's compiler may
implement an all-gather as an all-reduce of a zero-padded buffer; such instructions are counted
as what they are compiled to.

`cost` walks the same call graph for what XLA's own cost analysis gets wrong on these programs
(it counts a `while` body once, and the TPU compiler adds loops of its own: a collective matmul
steps through the shards of an FSDP-gathered weight): the FLOPs of every dot and convolution
(in-bounds window positions only) and the HBM bytes of every unfused instruction's operands and
results (buffers in the compiler's fast memory, `S(1)`, left out), loops multiplied out.

Each instruction's group size is read too (`replica_groups`, in list or iota form, or the
devices a `collective-permute`'s `source_target_pairs` name; an empty list is every device), so
that a step-time model can price a collective by the links its group spans (`step_time_band`).
"""

import collections
import math
import re
from typing import NamedTuple

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
         "ragged-all-to-all", "collective-broadcast")

_ITEMSIZE = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
             "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
             "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1,
             "f8e5m2fnuz": 1}
_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%([\w.\-]+) = (.+?) ([a-z][a-z0-9\-]*)\((.*)$")
_SHAPE = re.compile(r"\b(" + "|".join(sorted(_ITEMSIZE, key=len, reverse=True)) +
                    r")\[([0-9,]*)\]")
_CALLED = re.compile(r"\b(body|calls|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_CONDITION = re.compile(r"\bcondition=%([\w.\-]+)")
# The trip count XLA proved for a loop, in its backend config: "known_trip_count":{"n":"5"}.
_KNOWN_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CONSTANT_OPERAND = re.compile(r"(-?\d+)\)")  # what follows "constant(" in a scalar constant
_IOTA_GROUPS = re.compile(r"\breplica_groups=\[(\d+),(\d+)\]<=")  # [groups, size]<=[...]
_LIST_GROUPS = re.compile(r"\breplica_groups=\{(\{[^}]*\})?")  # the first group, if any
_PAIRS = re.compile(r"\bsource_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")


class Collective(NamedTuple):
  """One kind's total over a step: instructions in the program, executions and bytes."""

  instructions: int
  executions: int
  bytes: int


class Report(NamedTuple):
  by_kind: dict[str, Collective]
  unknown_trip_counts: int  # Loops counted once because their trip count was not readable.
  # (kind, group size) -> the same totals: what each chip exchanges within groups of that size.
  # Group size 0: every device of the program (an empty replica_groups).
  by_group: dict[tuple[str, int], Collective]

  @property
  def total_bytes(self) -> int:
    return sum(c.bytes for c in self.by_kind.values())


class _Instruction(NamedTuple):
  name: str
  type_text: str
  opcode: str
  rest: str
  root: bool


def _shape_bytes(type_text: str) -> list[int]:
  return [math.ceil(math.prod(int(d) for d in dims.split(",") if d) * _ITEMSIZE[dtype])
          for dtype, dims in _SHAPE.findall(type_text)]


def _parse(hlo_text: str) -> tuple[dict[str, list[_Instruction]], str]:
  """{computation name: instructions} and the entry computation's name."""
  computations: dict[str, list[_Instruction]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = computations.setdefault(header.group(1), [])
      if line.startswith("ENTRY "):
        entry = header.group(1)
      continue
    if line.rstrip() == "}":  # attribute text of a custom call may span lines starting "}}"
      current = None
      continue
    match = _INSTRUCTION.match(line) if current is not None else None
    if match:
      root, name, type_text, opcode, rest = match.groups()
      current.append(_Instruction(name, type_text, opcode, rest, bool(root)))
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return computations, entry


def _constants(instructions: list[_Instruction]) -> dict[str, int]:
  constants = {}
  for instruction in instructions:
    if instruction.opcode == "constant":
      value = _CONSTANT_OPERAND.match(instruction.rest)
      if value:
        constants[instruction.name] = int(value.group(1))
  return constants


def _tuple_index(instruction: _Instruction) -> int | None:
  index = re.search(r"\bindex=(\d+)", instruction.rest)
  return int(index.group(1)) if instruction.opcode == "get-tuple-element" and index else None


def _operands(instruction: _Instruction) -> list[str]:
  """The names of an instruction's operands (the HLO printer gives no operand types)."""
  return re.findall(r"%([\w.\-]+)", instruction.rest.split(")", 1)[0])


def _trip_count(computations: dict[str, list[_Instruction]], loop: _Instruction,
                caller: list[_Instruction]) -> int | None:
  """Iterations of a `counter < N` while loop, or None when its condition has another form.

  The counter is the tuple element the condition compares; its start is the loop's initial
  tuple's constant there (else 0) and its step the constants the body adds to it (else 1: the
  TPU compiler unrolls some loops, a collective matmul's body doing two steps of 2). Where XLA
  wrote the trip count into the loop's backend config (XLA:CPU does; its conditions compare in
  a fusion), that count is taken."""
  known = _KNOWN_TRIP_COUNT.search(loop.rest)
  if known:
    return int(known.group(1))
  condition_name = _CONDITION.search(loop.rest)
  body_name = dict(_CALLED.findall(loop.rest)).get("body")
  condition = computations.get(condition_name.group(1), []) if condition_name else []
  by_name = {i.name: i for i in condition}
  limit = counter = None
  for instruction in condition:
    if instruction.root and instruction.opcode == "compare" and "direction=LT" in instruction.rest:
      operands = _operands(instruction)
      constants = _constants(condition)
      if len(operands) == 2 and operands[1] in constants:
        limit = constants[operands[1]]
        counter = _tuple_index(by_name[operands[0]]) if operands[0] in by_name else None
  if limit is None:
    return None
  if counter is None:
    return limit
  start, step = 0, 0
  init = {i.name: i for i in caller}.get(next(iter(_operands(loop)), ""))
  if init is not None and init.opcode == "tuple":
    names = _operands(init)
    caller_constants = _constants(caller)
    start = caller_constants.get(names[counter], 0) if counter < len(names) else 0
  body = computations.get(body_name, [])
  body_by_name = {i.name: i for i in body}
  body_constants = _constants(body)
  root = next((i for i in body if i.root and i.opcode == "tuple"), None)
  value = body_by_name.get(_operands(root)[counter]) if root is not None else None
  while value is not None and value.opcode == "add":
    operands = _operands(value)
    constant = next((body_constants[o] for o in operands if o in body_constants), None)
    others = [o for o in operands if o not in body_constants]
    if constant is None or len(others) != 1:
      break
    step += constant
    value = body_by_name.get(others[0])
  if value is None or _tuple_index(value) != counter or step <= 0:
    step = 1
  return max(0, -(-(limit - start) // step))


def group_size(rest: str) -> int:
  """The devices in one group of a collective (0: every device), from its attribute text."""
  iota = _IOTA_GROUPS.search(rest)
  if iota:
    return int(iota.group(2))
  pairs = _PAIRS.search(rest)
  if pairs:
    return len(set(re.findall(r"\d+", pairs.group(1))))
  listed = _LIST_GROUPS.search(rest)
  if listed and listed.group(1):
    return len(re.findall(r"\d+", listed.group(1)))
  return 0


def _kind(opcode: str) -> str | None:
  base = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
  return base if base in KINDS else None


class _Visit(NamedTuple):
  """One instruction reached from the entry computation, with how often a step runs it."""

  computation: str
  instruction: _Instruction
  times: int  # executions per step (loop trip counts multiplied in)
  fused: bool  # inside a fusion's computation (its traffic is the fusion's operands/results)


def _walk(computations: dict[str, list[_Instruction]], entry: str) -> tuple[list[_Visit], int]:
  """Every instruction reachable from `entry` with its executions per step, and the number of
  loops whose trip count was unreadable (counted once). Reduction combiners are not entered."""
  visits, unknown = [], 0

  def walk(name: str, times: int, fused: bool) -> None:
    nonlocal unknown
    for instruction in computations.get(name, ()):
      visits.append(_Visit(name, instruction, times, fused))
      called = _CALLED.findall(instruction.rest)
      for branches in _BRANCHES.findall(instruction.rest):
        called += [("branch", b.strip().lstrip("%")) for b in branches.split(",") if b.strip()]
      for role, callee in called:
        if role == "body":
          trips = _trip_count(computations, instruction, computations.get(name, []))
          if trips is None:
            unknown += 1
          walk(callee, times * (trips if trips is not None else 1), fused)
        elif role != "to_apply" or instruction.opcode == "call":  # not reduction combiners
          walk(callee, times, fused or instruction.opcode == "fusion")

  walk(entry, 1, False)
  return visits, unknown


def count(hlo_text: str) -> Report:
  """Per-step collective counts and bytes of a compiled per-device HLO module's text."""
  computations, entry = _parse(hlo_text)
  visits, unknown = _walk(computations, entry)
  instructions = collections.Counter()
  executions = collections.Counter()
  total_bytes = collections.Counter()
  group_instructions = collections.Counter()
  group_executions = collections.Counter()
  group_bytes = collections.Counter()
  seen_static = set()
  for visit in visits:
    instruction, times = visit.instruction, visit.times
    kind = _kind(instruction.opcode)
    if kind is None:
      continue
    sizes = _shape_bytes(instruction.type_text)
    # Async starts return (operands..., outputs..., context); sync and all-reduce-start
    # return their (possibly variadic) results.
    size = max(sizes) if instruction.opcode.endswith("-start") and kind != "all-reduce" \
        else sum(sizes)
    group = (kind, group_size(instruction.rest))
    if (visit.computation, instruction.name) not in seen_static:
      seen_static.add((visit.computation, instruction.name))
      instructions[kind] += 1
      group_instructions[group] += 1
    executions[kind] += times
    total_bytes[kind] += times * size
    group_executions[group] += times
    group_bytes[group] += times * size
  by_kind = {k: Collective(instructions[k], executions[k], total_bytes[k])
             for k in KINDS if instructions[k]}
  by_group = {g: Collective(group_instructions[g], group_executions[g], group_bytes[g])
              for g in sorted(group_instructions)}
  return Report(by_kind, unknown, by_group)


class Cost(NamedTuple):
  """What a step's program computes and moves through HBM, per device, loops multiplied out."""

  flops: float  # 2 x multiply-adds of every dot and convolution (custom calls are opaque).
  hbm_bytes: float  # Operands and results of unfused instructions that live in HBM.
  unknown_trip_counts: int


_TYPED_SHAPE = re.compile(r"\b(" + "|".join(sorted(_ITEMSIZE, key=len, reverse=True)) +
                          r")\[([0-9,]*)\](\{[^}]*\})?")
_LHS_CONTRACTING = re.compile(r"\blhs_contracting_dims=\{([0-9,]*)\}")
_DIM_LABELS = re.compile(r"\bdim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)")
_WINDOW = re.compile(r"\bwindow=\{([^}]*)\}")
# Unfused instructions that move no data through HBM themselves (control flow, views, tuples) or
# whose data movement is priced elsewhere (collectives: the interconnect).
_NO_TRAFFIC = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "call",
               "conditional", "after-all", "partition-id", "replica-id", "add-dependency",
               "opt-barrier"}
# Unfused instructions that read only what they return out of their first operand.
_SLICING = {"slice", "dynamic-slice", "slice-start"}


def _dims(type_text: str) -> list[int]:
  match = _TYPED_SHAPE.search(type_text)
  return [int(d) for d in match.group(2).split(",") if d] if match else []


def _hbm_bytes(type_text: str) -> float:
  """Bytes of the arrays of a type that sit in HBM (not in memory space S(1) and above, the
  compiler's fast on-chip memory)."""
  return sum(_array_hbm_bytes(array) for array in _TYPED_SHAPE.findall(type_text))


def _array_hbm_bytes(array: tuple[str, str, str]) -> float:
  """Bytes of one (dtype, dims, layout) array of a type, 0 in fast memory (S(1) and above)."""
  dtype, dims, layout = array
  if layout and re.search(r"S\([1-9]", layout):
    return 0.0
  return math.prod(int(d) for d in dims.split(",") if d) * _ITEMSIZE[dtype]


def _flops(instruction: _Instruction, types: dict[str, str]) -> float:
  """2 x multiply-adds of a dot or convolution, from its operands' and result's shapes."""
  out = math.prod(_dims(instruction.type_text))
  operands = _operands(instruction)
  if instruction.opcode == "dot":
    lhs = _dims(types.get(operands[0], ""))
    contracting = _LHS_CONTRACTING.search(instruction.rest)
    axes = [int(a) for a in contracting.group(1).split(",") if a] if contracting else []
    return 2.0 * out * math.prod(lhs[a] for a in axes)
  return _convolution_flops(instruction, types, operands)


def _window(rest: str) -> dict[str, list[tuple[int, ...]]]:
  """A convolution's window attributes: {"size": [(k,), ...], "pad": [(lo, hi), ...], ...}."""
  match = _WINDOW.search(rest)
  fields = {}
  for field in (match.group(1).split() if match else []):
    key, _, value = field.partition("=")
    fields[key] = [tuple(int(v) for v in part.split("_")) for part in value.split("x")]
  return fields


def _convolution_flops(instruction: _Instruction, types: dict[str, str],
                       operands: list[str]) -> float:
  """2 x multiply-adds of a convolution on in-bounds inputs only: a compiler's collective matmul
  is a convolution over a padded window of shards, and the padded positions do no work."""
  labels = _DIM_LABELS.search(instruction.rest)
  if not labels or len(operands) < 2:
    return 0.0
  lhs_labels, rhs_labels, out_labels = labels.groups()
  lhs, rhs = _dims(types.get(operands[0], "")), _dims(types.get(operands[1], ""))
  out = _dims(instruction.type_text)
  if len(lhs) != len(lhs_labels) or len(rhs) != len(rhs_labels) or len(out) != len(out_labels):
    return 0.0
  window = _window(instruction.rest)
  spatial = sorted(c for c in out_labels if c.isdigit())
  pairs = 1
  for d, label in enumerate(spatial):
    size = lhs[lhs_labels.index(label)]
    positions, taps = out[out_labels.index(label)], rhs[rhs_labels.index(label)]
    low = window["pad"][d][0] if "pad" in window else 0
    stride = window["stride"][d][0] if "stride" in window else 1
    pairs *= sum(1 for o in range(positions) for k in range(taps)
                 if 0 <= o * stride + k - low < size)
  return (2.0 * out[out_labels.index("b")] * out[out_labels.index("f")]
          * rhs[rhs_labels.index("i")] * pairs)


def cost(hlo_text: str) -> Cost:
  """FLOPs and HBM bytes per step of a compiled per-device HLO module's text, every loop body
  counted as often as it runs (XLA's own cost analysis counts a `while` body once; compilers
  also add loops of their own, e.g. collective matmuls that step through the shards of an
  FSDP-gathered weight)."""
  computations, entry = _parse(hlo_text)
  types = {name: {i.name: i.type_text for i in instructions}
           for name, instructions in computations.items()}
  visits, unknown = _walk(computations, entry)
  flops = hbm = 0.0
  for visit in visits:
    instruction, local = visit.instruction, types[visit.computation]
    if instruction.opcode in ("dot", "convolution"):
      flops += visit.times * _flops(instruction, local)
    if not visit.fused and _moves_hbm(instruction.opcode):
      hbm += visit.times * _moved_bytes(instruction, local, computations)
  return Cost(flops, hbm, unknown)


def _moves_hbm(opcode: str) -> bool:
  """Whether an unfused instruction's own operands and results are HBM traffic: not control
  flow, views or tuples, not collectives (priced as communication), not the end of an async op
  (it waits; its start moved the data)."""
  return not (opcode in _NO_TRAFFIC or _kind(opcode) or opcode.endswith("-done"))


def _moved_bytes(instruction: _Instruction, types: dict[str, str],
                 computations: dict[str, list[_Instruction]]) -> float:
  """HBM bytes an unfused instruction reads and writes. A fusion that only slices an operand (a
  scanned layer's weights out of the stacked ones) reads the slices; an output of a fusion that
  updates a slice of a buffer in place (a scan's stacked outputs, several at once in a
  multi-output fusion) writes the update and does not read the buffer."""
  operands = _operands(instruction)
  read = [_hbm_bytes(types.get(name, "")) for name in operands]
  written = _hbm_bytes(instruction.type_text)
  if instruction.opcode == "copy-start":  # (destination, source, context): writes the first
    arrays = _TYPED_SHAPE.findall(instruction.type_text)
    return sum(read) + (_array_hbm_bytes(arrays[0]) if arrays else 0.0)
  if instruction.opcode in _SLICING and read:
    # The slice (the last array of the result: an async start also returns its operand) is read
    # from the operand and written where the result lives.
    dtype, dims, layout = [m for m in _TYPED_SHAPE.findall(instruction.type_text) if m[1]][-1]
    size = math.prod(int(d) for d in dims.split(",") if d) * _ITEMSIZE[dtype]
    in_fast_memory = bool(layout and re.search(r"S\([1-9]", layout))
    return min(read[0], size) + (0 if in_fast_memory else size)
  fused = dict(_CALLED.findall(instruction.rest)).get("calls")
  if instruction.opcode == "fusion" and fused in computations:
    body = computations[fused]
    body_types = {i.name: i.type_text for i in body}
    parameters = {int(re.match(r"(\d+)", i.rest).group(1)): i.name for i in body
                  if i.opcode == "parameter" and re.match(r"(\d+)", i.rest)}
    for index, name in parameters.items():
      users = [i for i in body if name in _operands(i)]
      if index < len(read) and users and all(
          u.opcode in ("dynamic-slice", "slice") and _operands(u)[0] == name for u in users):
        read[index] = min(read[index], sum(_hbm_bytes(u.type_text) for u in users))
    by_name = {i.name: i for i in body}
    root = next((i for i in body if i.root), None)
    # A multi-output fusion's root is a tuple: each output is written (or updated) on its own.
    outputs = ([by_name.get(name) for name in _operands(root)]
               if root is not None and root.opcode == "tuple" else [root])
    arrays = _TYPED_SHAPE.findall(instruction.type_text)
    if len(outputs) == len(arrays):
      written = 0.0
      for output, array in zip(outputs, arrays):
        size = _array_hbm_bytes(array)
        while output is not None and output.opcode == "bitcast":
          output = by_name.get(next(iter(_operands(output)), ""))
        if output is not None and output.opcode == "dynamic-update-slice" and size:
          target, update = (_operands(output) + ["", ""])[:2]
          size = min(size, _hbm_bytes(body_types.get(update, "")))
          for index, name in parameters.items():  # the updated buffer is not read
            if name == target and index < len(read):
              read[index] = 0.0
        written += size
  return written + sum(read)
