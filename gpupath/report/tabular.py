"""CSV and Parquet writers of the export registry (:mod:`gpupath.report.export`): a query plan's
rows as :data:`gpupath.query.RESULT_SCHEMA` columns, streamed batch by batch."""

from __future__ import annotations

from typing import BinaryIO

import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from gpupath.query import RESULT_SCHEMA, QueryPlan, iter_query

__all__ = ["write_csv", "write_parquet"]


def _stream(plan: QueryPlan, writer: pcsv.CSVWriter | pq.ParquetWriter) -> int:
    count = 0
    try:
        for batch in iter_query(plan):
            writer.write_batch(batch)
            count += batch.num_rows
    finally:
        writer.close()
    return count


def write_csv(plan: QueryPlan, sink: BinaryIO) -> int:
    """A header, then one row per detection (label by name); returns the rows written."""
    return _stream(plan, pcsv.CSVWriter(sink, RESULT_SCHEMA))


def write_parquet(plan: QueryPlan, sink: BinaryIO) -> int:
    """One zstd Parquet file of :data:`~gpupath.query.RESULT_SCHEMA`; returns the rows written."""
    return _stream(plan, pq.ParquetWriter(sink, RESULT_SCHEMA, compression="zstd"))
