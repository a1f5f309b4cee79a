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


def _trip_count(condition: list[_Instruction]) -> int | None:
  """N of a `counter < N` loop condition, or None when it has another form."""
  constants = {}
  for instruction in condition:
    if instruction.opcode == "constant":
      value = _CONSTANT_OPERAND.match(instruction.rest)
      if value:
        constants[instruction.name] = int(value.group(1))
  for instruction in condition:
    if instruction.root and instruction.opcode == "compare" and "direction=LT" in instruction.rest:
      operands = re.findall(r"%([\w.\-]+)", instruction.rest.split(")", 1)[0])
      if len(operands) == 2 and operands[1] in constants:
        return constants[operands[1]]
  return None


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


def count(hlo_text: str) -> Report:
  """Per-step collective counts and bytes of a compiled per-device HLO module's text."""
  computations, entry = _parse(hlo_text)
  instructions = collections.Counter()
  executions = collections.Counter()
  total_bytes = collections.Counter()
  group_instructions = collections.Counter()
  group_executions = collections.Counter()
  group_bytes = collections.Counter()
  unknown = 0
  seen_static = set()

  def walk(name: str, times: int) -> None:
    nonlocal unknown
    for instruction in computations.get(name, ()):
      kind = _kind(instruction.opcode)
      if kind is not None:
        sizes = _shape_bytes(instruction.type_text)
        # Async starts return (operands..., outputs..., context); sync and all-reduce-start
        # return their (possibly variadic) results.
        size = max(sizes) if instruction.opcode.endswith("-start") and kind != "all-reduce" \
            else sum(sizes)
        group = (kind, group_size(instruction.rest))
        if (name, instruction.name) not in seen_static:
          seen_static.add((name, instruction.name))
          instructions[kind] += 1
          group_instructions[group] += 1
        executions[kind] += times
        total_bytes[kind] += times * size
        group_executions[group] += times
        group_bytes[group] += times * size
      called = _CALLED.findall(instruction.rest)
      for branches in _BRANCHES.findall(instruction.rest):
        called += [("branch", b.strip().lstrip("%")) for b in branches.split(",") if b.strip()]
      for role, callee in called:
        if role == "body":
          condition = _CONDITION.search(instruction.rest)
          trips = _trip_count(computations.get(condition.group(1), [])) if condition else None
          if trips is None:
            unknown += 1
          walk(callee, times * (trips if trips is not None else 1))
        elif role != "to_apply" or instruction.opcode == "call":  # not reduction combiners
          walk(callee, times)

  walk(entry, 1)
  by_kind = {k: Collective(instructions[k], executions[k], total_bytes[k])
             for k in KINDS if instructions[k]}
  by_group = {g: Collective(group_instructions[g], group_executions[g], group_bytes[g])
              for g in sorted(group_instructions)}
  return Report(by_kind, unknown, by_group)
