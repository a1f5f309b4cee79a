"""A user's input spec -> the sorted list of files it names, local or gs://.

Datasets come as thousands of shards, named the ways webdataset and `gsutil` users write them:

* a glob: `gs://bucket/laion/*.tar` (`*`, `?`, `[...]`, within one directory level);
* brace ranges and alternatives: `shard-{00000..00099}.tar` (zero-padded as written),
  `{train,val}/part-*.parquet`;
* a directory: its entries with the source's extensions (a subdirectory named like a file
  is not told apart: that would cost a request per entry);
* any of these, comma-separated: `a.tar,b.tar,gs://b/c/*.tar`.

Every host of a job expands the spec itself, so the result must not depend on the host: it is
sorted and free of duplicates. Listings go through `etils.epath` (tf.io.gfile on gs://) and are
kept few, since each is a request to Cloud Storage: one glob per pattern, one listing per
directory of explicitly named files (checking that they exist), none per file.
"""

from collections.abc import Iterator, Sequence
import os
import re

from etils import epath

from self_flow import storage

_WILDCARDS = re.compile(r"[*?\[]")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


def expand_inputs(spec: str, extensions: Sequence[str]) -> list[str]:
  """The files `spec` names (see the module docstring), sorted, each once.

  Args:
    spec: the user's input spec.
    extensions: file name endings (".tar", ".parquet", case-insensitive) that directory listings
      and glob matches keep; a file named explicitly is taken whatever its name.

  Raises:
    ValueError: the spec is empty or malformed, or a glob or directory yields no such file.
    FileNotFoundError: an explicitly named file does not exist.
  """
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"The input spec {spec!r} names no files; give a glob, a brace range, a "
                     "directory or a comma-separated list of files.")
  extensions = tuple(e.lower() for e in extensions)
  files, named = set(), []  # named: (file, the spec item it came from), checked together.
  for item in _split_top_level(spec.strip(), ","):
    item = item.strip()
    if not item:
      raise ValueError(f"The input spec {spec!r} has an empty item between commas.")
    for pattern in _expand_braces(item):
      if _WILDCARDS.search(pattern):
        files.update(_glob(pattern, extensions))
      elif pattern == item and storage.is_dir(pattern):  # Brace expansions are files.
        files.update(_directory_files(pattern, extensions))
      else:
        named.append((pattern, item))
  files.update(_existing(named))
  return sorted(files)


def _split_top_level(text: str, separator: str) -> list[str]:
  """`text` split at each `separator` outside braces."""
  parts, depth, start = [], 0, 0
  for i, char in enumerate(text):
    if char == "{":
      depth += 1
    elif char == "}":
      depth -= 1
      if depth < 0:
        raise ValueError(f"Unbalanced '}}' at position {i} of {text!r}.")
    elif char == separator and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  if depth:
    raise ValueError(f"Unbalanced '{{' in {text!r}.")
  parts.append(text[start:])
  return parts


def _expand_braces(pattern: str) -> Iterator[str]:
  """Every name of `pattern`'s first brace group (`{a,b}` or `{0..9}`), each expanded in turn.

  A range counts up or down; it is zero-padded to its longer end when either end has a leading
  zero (`{00..10}` -> 00, 01, ..., 10), as bash and webdataset do. `{x}`, without a comma or
  `..`, stays literal.
  """
  start = pattern.find("{")
  if start < 0:
    yield pattern
    return
  depth = 0
  for end in range(start, len(pattern)):
    depth += {"{": 1, "}": -1}.get(pattern[end], 0)
    if depth == 0:
      break
  else:
    raise ValueError(f"Unbalanced '{{' in {pattern!r}.")
  head, body, tail = pattern[:start], pattern[start + 1:end], pattern[end + 1:]
  numbers = _RANGE.match(body)
  if numbers:
    first, last = int(numbers[1]), int(numbers[2])
    padded = any(len(n) > 1 and n.startswith("0") for n in numbers.groups())
    width = max(map(len, numbers.groups())) if padded else 0
    step = 1 if last >= first else -1
    options = [f"{n:0{width}d}" for n in range(first, last + step, step)]
  else:
    options = _split_top_level(body, ",")
    if len(options) == 1:  # Literal braces: keep them, expand what follows.
      for rest in _expand_braces(tail):
        yield f"{head}{{{body}}}{rest}"
      return
  for option in options:
    yield from _expand_braces(head + option + tail)


def _matches(name: str, extensions: tuple[str, ...]) -> bool:
  return name.lower().endswith(extensions)


def _glob(pattern: str, extensions: tuple[str, ...]) -> list[str]:
  """The files matching `pattern` whose names end with `extensions`; one listing request."""
  wildcard = _WILDCARDS.search(pattern).start()
  slash = pattern.rfind("/", 0, wildcard)
  if "/" in pattern[wildcard:]:
    # epath would glob subdirectories level by level; shards live in one directory.
    raise ValueError(f"The glob {pattern!r} has a wildcard in a directory name; only the file "
                     "name may hold wildcards (e.g. gs://bucket/data/*.tar).")
  directory = pattern[:slash] if slash > 0 else ("/" if slash == 0 else ".")
  matches = [os.fspath(path) for path in epath.Path(directory).glob(pattern[slash + 1:])]
  kept = [path for path in matches if _matches(path, extensions)]
  if not kept:
    found = f"; it matches {len(matches)} other files, e.g. {matches[0]!r}" if matches else ""
    raise ValueError(f"The glob {pattern!r} matches no {'/'.join(extensions)} files{found}.")
  return kept


def _directory_files(directory: str, extensions: tuple[str, ...]) -> list[str]:
  names = [name for name in storage.list_names(directory) if _matches(name, extensions)]
  if not names:
    raise ValueError(f"The directory {directory!r} holds no {'/'.join(extensions)} files.")
  return [storage.join(directory, name) for name in names]


def _existing(named: list[tuple[str, str]]) -> list[str]:
  """The explicitly named files, after checking that they exist with one listing per directory
  (a brace range of 10,000 shards costs one request, not 10,000)."""
  listings: dict[str, set[str]] = {}
  missing = []
  for path, item in named:
    directory, name = os.fspath(epath.Path(path).parent), epath.Path(path).name
    if directory not in listings:
      listings[directory] = set(storage.list_names(directory))
    if name not in listings[directory]:
      missing.append((path, item))
  if missing:
    shown = ", ".join(f"{path!r} (from {item!r})" for path, item in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    raise FileNotFoundError(f"{len(missing)} input files do not exist: {shown}{more}.")
  return [path for path, _ in named]
