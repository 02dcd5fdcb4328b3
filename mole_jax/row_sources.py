"""Where a decode step's table rows come from, and every byte that moves host -> device.

MoLE's routed experts read the table rows of the step's tokens, in the table's stored form (float or quantized),
dequantized on the device layer by layer (`TableRows.for_layer`). The table lives at one of three placements:
    device   all of it in accelerator memory (`DeviceTable`): rows are gathered inside the step by token id
    host     in host RAM (`HostRows`): the step's distinct ids are gathered into a reused staging buffer
    storage  read from the Tensorstore table (`StorageRows`): one batched read of the distinct ids
Host and storage sources send the rows of a step in one explicit `device_put` (`Transfers.put`, which counts it).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mole_jax import schemes

PLACEMENTS = ("device", "host", "storage")


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class Transfers:
    """The one way onto the device: explicit `device_put`s, with the bytes counted."""

    def __init__(self):
        self.bytes_sent = 0

    def put(self, tree):
        self.bytes_sent += nbytes(tree)
        return jax.device_put(tree)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TableRows:
    """Table rows on the device, in the stored form: `stored` arrays of R rows each (the whole table for the device
    placement, else a step's distinct ids) and each token's row among them. The model reads them through
    `for_layer` (model.Transformer.layers)."""

    stored: dict[str, jax.Array]  # every array [R, L, ...] (schemes.Layout.arrays)
    index_BxT: jax.Array
    scheme: str = dataclasses.field(metadata={"static": True})

    def for_layer(self, l: int) -> jax.Array:
        """Layer l's rows of the tokens, float [B, T, N, D]: pick, then dequantize only what this layer reads."""
        B, T = self.index_BxT.shape
        picked = {k: v[self.index_BxT.reshape(-1), l:l + 1] for k, v in self.stored.items()}
        rows_Mx1xNxD = schemes.dequantize(picked, self.scheme, xp=jnp)
        return rows_Mx1xNxD.reshape(B, T, *rows_Mx1xNxD.shape[2:])


class DeviceTable:
    """The device placement: the whole stored table resident on the device, indexed by token id."""

    def __init__(self, table, transfers: Transfers):
        self.scheme = table.scheme
        self.stored = transfers.put(table.read_all_stored())

    def rows(self, ids_BxT: jax.Array) -> TableRows:
        return TableRows(self.stored, ids_BxT, self.scheme)


class _Staging:
    """Reused host buffers for a step's stored rows. Two per shape, used in turn: a buffer is rewritten two steps
    after it was sent, when that step's transfer (asynchronous, or a zero-copy alias on CPU) and computation are
    long over."""

    def __init__(self, table):
        self.form = table.layout.arrays  # {name: (row shape, dtype)}
        self._buffers: dict[int, list[dict[str, np.ndarray]]] = {}
        self._turn = 0

    def buffer(self, num_rows: int) -> dict[str, np.ndarray]:
        pair = self._buffers.get(num_rows)
        if pair is None:
            pair = self._buffers[num_rows] = [{k: np.empty((num_rows, *shape), dt) for k, (shape, dt)
                                               in self.form.items()} for _ in range(2)]
        self._turn ^= 1
        return pair[self._turn]


class _FetchedRows:
    """A table off the device: the rows of a step's distinct ids are gathered on the host, then sent at once."""

    def __init__(self, table, transfers: Transfers):
        self.table, self.scheme, self.transfers = table, table.scheme, transfers
        self.staging = _Staging(table)

    def fetch(self, ids: np.ndarray, num_rows: int) -> TableRows:
        """The stored rows of the distinct ids of `ids` (padded to `num_rows` rows, so the step's shapes do not
        change as the number of distinct ids does) and each token's row among them, in one put."""
        unique_U, inverse = np.unique(ids.reshape(-1), return_inverse=True)
        out = self.staging.buffer(num_rows)
        self._read_into(unique_U, {k: v[:len(unique_U)] for k, v in out.items()})
        stored, index = self.transfers.put((out, inverse.reshape(ids.shape).astype(np.int32)))
        return TableRows(stored, index, self.scheme)

    def _read_into(self, ids_U: np.ndarray, out: dict[str, np.ndarray]) -> None:
        raise NotImplementedError


class HostRows(_FetchedRows):
    """The host placement: the whole stored table in host RAM, rows gathered with np.take."""

    def __init__(self, table, transfers: Transfers):
        super().__init__(table, transfers)
        self.stored = table.read_all_stored()

    def _read_into(self, ids_U, out):
        for k, v in self.stored.items():
            np.take(v, ids_U, axis=0, out=out[k])


class StorageRows(_FetchedRows):
    """The storage placement: rows read from the table's files (one batched Tensorstore read per step)."""

    def _read_into(self, ids_U, out):
        for k, v in self.table.read_stored(ids_U).items():
            out[k][...] = v


def row_source(table, placement: str, transfers: Transfers):
    """The rows of `table` kept at `placement`: a DeviceTable, HostRows or StorageRows."""
    return {"device": DeviceTable, "host": HostRows, "storage": StorageRows}[placement](table, transfers)
