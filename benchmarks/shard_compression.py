"""What ArrayRecord's default zstd compression costs the reader of a latent shard's 1 MiB record.

  taskset -c 1 python benchmarks/shard_compression.py [--records=64] [--repeats=5]

Writes the same full-entropy records (512 x 1024 float16: the size of a t2i caption embedding,
128 x 4096) with the shards' options (`layout.WRITER_OPTIONS`, zstd by default) and with
`uncompressed` added, then reads every record back through grain's ArrayRecord data source, as
the training pipeline does, and prints the median read time per record and the file sizes.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from array_record.python import array_record_data_source, array_record_module

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# pylint: disable=g-import-not-at-top,wrong-import-position
from self_flow.data.latent_shards import layout


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--records", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  records = [rng.standard_normal(512 * 1024).astype(np.float16).tobytes()
             for _ in range(args.records)]
  with tempfile.TemporaryDirectory() as directory:
    for options in (layout.WRITER_OPTIONS, layout.WRITER_OPTIONS + ",uncompressed"):
      path = os.path.join(directory, options.replace(":", "_").replace(",", "_"))
      writer = array_record_module.ArrayRecordWriter(path, options)
      for record in records:
        writer.write(record)
      writer.close()
      source = array_record_data_source.ArrayRecordDataSource([path])
      seconds = []
      for _ in range(args.repeats):
        start = time.perf_counter()
        for index in range(args.records):
          source[index]  # pylint: disable=pointless-statement
        seconds.append((time.perf_counter() - start) / args.records)
      print(f"{options}: {statistics.median(seconds) * 1e3:.3f} ms per 1 MiB record, file "
            f"{os.path.getsize(path) / 2**20:.1f} MiB for {args.records} records")


if __name__ == "__main__":
  main()
