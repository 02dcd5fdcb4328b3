"""Inference, the public face: `mole_jax.load(ckpt, lut=..., lut_placement=...)` -> LanguageModel with `.logits`,
`.token_logprobs`, `.generate`, `.stream` and `.generate_text`.

A LanguageModel validates its inputs on the host and drives a decoder (decoder.Decoder, or offload.OffloadDecoder
for the MoE baseline); scoring (`logits`, `token_logprobs`) is one jitted full pass. MoLE's table, when given, is
kept at one of row_sources.PLACEMENTS and the routed experts never reach the device.
"""

from __future__ import annotations

from collections import deque
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mole_jax import checkpoint, data
from mole_jax.config import ModelConfig, MoleError
from mole_jax.convert import fingerprint_checkpoint
from mole_jax.decoder import PREFILL_ROWS_BYTES, Decoder, chunked_loop, decode_loop
from mole_jax.lut import LookupTable, open_lut
from mole_jax.model import ArrayRows, Params, graphdef_and_shapes, without_routed_experts
from mole_jax.offload import OffloadDecoder
from mole_jax.row_sources import PLACEMENTS, TableReader, TieredRows, device_tier, next_pow2
from mole_jax.sampling import Sampler, generation_sampler, positions


def check_ids(ids, cfg: ModelConfig, *, max_len: int | None = None) -> np.ndarray:
    """Validate token ids on the host: an int array [B, T], 0 <= id < V, T within the context."""
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise MoleError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise MoleError(f"token ids must have shape [batch, length], got shape {arr.shape}")
    if arr.size == 0:
        raise MoleError(f"token ids are empty (shape {arr.shape})")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= cfg.vocab_size:
        bad = lo if lo < 0 else hi
        raise MoleError(f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")
    limit = max_len or cfg.max_seq_len
    if arr.shape[1] > limit:
        raise MoleError(f"sequence length {arr.shape[1]} exceeds the model's context of {limit} tokens")
    return arr.astype(np.int32)


def check_prompts(prompt_ids, max_new_tokens, cfg: ModelConfig) -> tuple[list[np.ndarray], bool]:
    """Validated prompts, and whether a single prompt (a flat list or 1-D array) was given."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise MoleError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(prompt_ids, (list, tuple, np.ndarray, jax.Array)):
        raise MoleError(f"prompts must be token ids (a list of ints, a list of lists, or an int array), got "
                        f"{type(prompt_ids).__name__}")
    if len(prompt_ids) == 0:
        raise MoleError("the prompt is empty: give at least one token")
    single = all(np.ndim(p) == 0 for p in prompt_ids)
    out = []
    for i, p in enumerate([prompt_ids] if single else prompt_ids):
        if np.size(p) == 0:
            raise MoleError("the prompt is empty: give at least one token" if single else
                            f"prompt {i} is empty: give at least one token")
        p = check_ids(np.asarray(p).reshape(1, -1), cfg)[0]
        if len(p) + max_new_tokens > cfg.max_seq_len:
            raise MoleError(f"a prompt of {len(p)} tokens plus {max_new_tokens} new tokens exceeds the model's "
                            f"context of {cfg.max_seq_len} tokens")
        out.append(p)
    return out, single


# Scoring: one full pass, jitted -------------------------------------------------------------------------------
def _logits(graphdef, params, ids_BxT, rows_UxLxNxD, index_BxT):
    rows = None if rows_UxLxNxD is None else ArrayRows(rows_UxLxNxD[index_BxT])
    return nnx.merge(graphdef, params).forward(ids_BxT, rows=rows)[0]


def _token_logprobs(graphdef, params, ids_BxT, targets_BxT, rows):
    """log p(target | prefix) and whether the target is the argmax, at every position ([B, T] each). The head runs
    one sequence at a time (lax.map): memory holds [T, V] logits, never [B, T, V] (16 x 2048 x 50304 is 6.6 GB).
    rows: fetched TableRows, or a TableReader the pass reads itself."""
    model = nnx.merge(graphdef, params)
    B, T = ids_BxT.shape
    rows = rows.rows(ids_BxT) if isinstance(rows, TableReader) else rows
    x0_BxTxD = model.embed(ids_BxT)
    routed = model.routed_input(ids_BxT, x0_BxTxD, rows)
    h_BxTxD, _, _ = model.layers(x0_BxTxD, positions(jnp.zeros((B,), jnp.int32), T), routed)

    def score(args):
        h_TxD, target_T = args
        logits_TxV = model.head(h_TxD)
        logp_T = jnp.take_along_axis(jax.nn.log_softmax(logits_TxV, axis=-1), target_T[:, None], axis=-1)[:, 0]
        return logp_T, jnp.argmax(logits_TxV, axis=-1) == target_T

    return jax.lax.map(score, (h_BxTxD, targets_BxT))


class LanguageModel:
    """A model ready for inference on the default device: `.logits`, `.token_logprobs` (scoring), `.generate`,
    `.stream`, `.generate_text`.

    table: MoLE's lookup table (a `lut.LookupTable`, or any object with its interface) for the inference form,
    kept at `placement`; None runs the model as trained. offload_experts: MoE only, the offloading baseline.
    host_read, storage_read, steps_per_dispatch, overlap, tier_K (the ids of a device tier), speculate and
    prefill_rows_bytes (the bound on a prefill chunk's rows and on a mapped table's resident pages): see
    decoder.Decoder.
    """

    def __init__(self, cfg: ModelConfig, params: Params, *, table=None, placement: str = "device",
                 offload_experts: bool = False, overlap: bool = True, run_dir: Path | None = None,
                 tier_K: np.ndarray | None = None, speculate: bool = True, host_read: str = "program",
                 storage_read: str = "auto", steps_per_dispatch: int | None = None,
                 prefill_rows_bytes: int = PREFILL_ROWS_BYTES):
        if placement not in PLACEMENTS:
            raise MoleError(f"unknown LUT placement {placement!r}: use one of {', '.join(PLACEMENTS)}")
        if table is not None and cfg.kind != "mole":
            raise MoleError(f"a lookup table is only for MoLE models, not {cfg.kind}")
        if offload_experts and cfg.kind != "moe":
            raise MoleError(f"expert offloading is the MoE baseline; this model is {cfg.kind}")
        self.config, self.table, self.run_dir, self.offload_experts = cfg, table, run_dir, offload_experts
        self.placement = placement if table is not None else None
        self._tokenizer = None
        if table is not None:
            _check_table_shape(table, cfg)
            params = without_routed_experts(params)
        if offload_experts:
            self.decoder = OffloadDecoder(cfg, params)
        else:
            self.decoder = Decoder(cfg, params, table=table, placement=placement, overlap=overlap, tier_K=tier_K,
                                   speculate=speculate, host_read=host_read, storage_read=storage_read,
                                   steps_per_dispatch=steps_per_dispatch, prefill_rows_bytes=prefill_rows_bytes)
        graphdef, _ = graphdef_and_shapes(cfg, with_experts=table is None)
        self._logits = jax.jit(partial(_logits, graphdef))
        self._token_logprobs = jax.jit(partial(_token_logprobs, graphdef))
        self._scoring: deque = deque()  # token_logprobs calls whose fetched rows may still be in use

    @property
    def params(self) -> Params:
        return self.decoder.params

    @property
    def h2d_bytes(self) -> int:
        """Bytes sent host -> device so far (parameters, tables, prompts, LUT rows, offloaded experts)."""
        return self.decoder.h2d_bytes

    @property
    def device_param_bytes(self) -> int:
        return self.decoder.device_param_bytes

    def _need_experts_on_device(self, what: str) -> None:
        if self.offload_experts:
            raise MoleError(f"{what}() needs the experts on the device; load the MoE without offload_experts")

    def logits(self, ids) -> np.ndarray:
        """Next-token logits, float32 numpy [B, T, V], for int token ids [B, T] (one full pass, no cache). A table's
        rows are dequantized on the host (LookupTable.rows): a reference for the decoder's device-side path."""
        ids = check_ids(ids, self.config)
        self._need_experts_on_device("logits")
        rows = None
        if self.table is not None:
            unique_U, inverse = np.unique(ids.reshape(-1), return_inverse=True)
            rows = (self.table.rows(unique_U), inverse.reshape(ids.shape).astype(np.int32))
        ids_d, rows = self.decoder.transfers.put((ids, rows))
        return jax.device_get(self._logits(self.params, ids_d, *(rows or (None, None))))

    def token_logprobs(self, inputs_BxT, targets_BxT) -> tuple[jax.Array, jax.Array]:
        """Scoring, as lm-eval's loglikelihood needs it: for int token ids [B, T] and their next tokens [B, T],
        log p(targets[b, t] | inputs[b, :t+1]) (float32 [B, T]) and whether each target is the argmax (bool [B, T]).

        One jitted call on the device; only these [B, T] values come back, never the [B, T, V] logits. It is traced
        once per (B, T) (pad T to a few buckets), and for a table at the host or storage placement per power of two
        of distinct ids: the rows of the batch's distinct ids travel in the table's stored form, in one put (the
        device placement gathers from its resident table). Returns device arrays as soon as the call is dispatched,
        so the caller can prepare the next batch while this one runs (np.asarray reads them).
        """
        ids = check_ids(inputs_BxT, self.config)
        targets = check_ids(targets_BxT, self.config)
        if targets.shape != ids.shape:
            raise MoleError(f"targets have shape {targets.shape} but inputs have shape {ids.shape}")
        self._need_experts_on_device("token_logprobs")
        dec = self.decoder
        ids_d, targets_d = dec.transfers.put((ids, targets))
        if not dec.fetching:  # the pass reads every row itself
            return self._token_logprobs(self.params, ids_d, targets_d, dec.reader)
        if len(self._scoring) == 2:  # the staging buffer about to be refilled was sent two calls ago: done?
            jax.block_until_ready(self._scoring.popleft())
        rows = (dec.source.fetch(ids, ids_d) if isinstance(dec.source, TieredRows)
                else dec.source.fetch(ids, next_pow2(len(np.unique(ids)))))
        out = self._token_logprobs(self.params, ids_d, targets_d, rows)
        self._scoring.append(out)
        return out

    # Generation ----------------------------------------------------------------------------------------------
    def _sampler(self, temperature, top_k, top_p, eos_id) -> Sampler | None:
        V = self.config.vocab_size
        if eos_id is not None and not 0 <= eos_id < V:
            raise MoleError(f"eos_id {eos_id} is outside the vocabulary [0, {V})")
        if not temperature >= 0:
            raise MoleError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
        if top_k is not None and not 1 <= top_k:
            raise MoleError(f"top_k must be a positive integer, got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise MoleError(f"top_p must be in (0, 1], got {top_p}")
        if temperature == 0:
            return None
        # One static form for every setting (one trace of the step): the largest GENERATE_CANDIDATES logits, the
        # full sort only for a row whose cutoff lies beyond them (sampling.generation_sampler).
        return self.decoder.transfers.put(generation_sampler(temperature, top_k, top_p, V, jax.default_backend()))

    def _steps(self, prompts: list[np.ndarray], max_new_tokens: int, sampler: Sampler | None, seed: int, *,
               eos_id: int | None = None, with_logits: bool = False) -> Iterator[tuple[np.ndarray, jax.Array]]:
        """Per step: the new token of every sequence (host numpy [B]) and, with_logits, the logits it came from
        (device). May stop after the step where every sequence has produced eos_id."""
        lengths = np.array([len(p) for p in prompts], np.int32)
        longest = int(lengths.max())
        cache_len = min(next_pow2(longest + max_new_tokens), self.config.max_seq_len)
        T = min(max(next_pow2(longest), 8), cache_len)
        # Right-padded with each prompt's first token: the padding's keys stay masked, and MoLE needs no extra row.
        ids_BxT = np.stack([np.concatenate([p, np.full(T - len(p), p[0], np.int32)]) for p in prompts])
        greedy = sampler is None
        state = self.decoder.prefill(ids_BxT, lengths, cache_len, seed, sampler, greedy)
        if getattr(self.decoder, "chunked", False):
            yield from chunked_loop(self.decoder, state, max_new_tokens, sampler, greedy, eos_id=eos_id,
                                    with_logits=with_logits)
        else:
            yield from decode_loop(self.decoder, state, max_new_tokens, sampler, greedy)

    def stream(self, prompt_ids, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, eos_id: int | None = None, seed: int = 0) -> Iterator[list[int | None]]:
        """Yield, step by step, each prompt's new token id, or None for a prompt that already stopped at eos_id.
        See `generate` for the arguments."""
        prompts, _ = check_prompts(prompt_ids, max_new_tokens, self.config)
        sampler = self._sampler(temperature, top_k, top_p, eos_id)
        live = np.ones(len(prompts), bool)
        for ids_B, _ in self._steps(prompts, max_new_tokens, sampler, seed, eos_id=eos_id):
            out = [int(t) if a else None for t, a in zip(ids_B, live)]
            if eos_id is not None:
                live &= ids_B != eos_id
            yield [None if t == eos_id else t for t in out]
            if not live.any():
                return

    def generate(self, prompt_ids, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, eos_id: int | None = None, seed: int = 0,
                 return_logits: bool = False):
        """New token ids for each prompt.

        prompt_ids: one prompt (a list of ints), a list of prompts of any lengths, or an int array [B, T].
        temperature 0 (the default) is greedy; otherwise sample from softmax(logits / temperature) restricted to
        the top_k most likely tokens and to the smallest set whose probability reaches top_p. Generation of a
        sequence stops before eos_id (not included). Returns a list of ints for one prompt, else a list of lists;
        with return_logits, also the float32 logits each new token was chosen from ([n_new, V] per prompt).
        """
        prompts, single = check_prompts(prompt_ids, max_new_tokens, self.config)
        sampler = self._sampler(temperature, top_k, top_p, eos_id)
        new, logits = [[] for _ in prompts], [[] for _ in prompts]
        live = np.ones(len(prompts), bool)
        for ids_B, logits_BxV in self._steps(prompts, max_new_tokens, sampler, seed, eos_id=eos_id,
                                             with_logits=return_logits):
            if return_logits:
                logits_BxV = jax.device_get(logits_BxV)
            for b in np.flatnonzero(live):
                if eos_id is not None and ids_B[b] == eos_id:
                    live[b] = False
                    continue
                new[b].append(int(ids_B[b]))
                if return_logits:
                    logits[b].append(logits_BxV[b])
            if not live.any():
                break
        if not return_logits:
            return new[0] if single else new
        logits = [np.stack(x) if x else np.zeros((0, self.config.vocab_size), np.float32) for x in logits]
        return (new[0], logits[0]) if single else (new, logits)

    # Text ------------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The run's tokenizer (RUN_DIR/tokenizer.json), or None."""
        if self._tokenizer is None and self.run_dir is not None:
            path = Path(self.run_dir) / checkpoint.TOKENIZER
            if path.is_file():
                self._tokenizer = data.load_tokenizer(path)
        return self._tokenizer

    @property
    def eos_id(self) -> int | None:
        return None if self.tokenizer is None else self.tokenizer.token_to_id(data.EOS)

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise MoleError("this run has no tokenizer (RUN_DIR/tokenizer.json): give token ids instead of text")
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        ids = self._need_tokenizer().encode(text, add_special_tokens=False).ids
        if not ids:
            raise MoleError("the prompt is empty: give at least one token")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._need_tokenizer().decode(list(ids))

    def generate_text(self, prompt: str | Sequence[str], max_new_tokens: int, **kw) -> str | list[str]:
        """The continuation of each prompt as text (stopping at the tokenizer's end-of-text token by default);
        keyword arguments as for `generate`."""
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        kw.setdefault("eos_id", self.eos_id)
        new = self.generate([self.encode(t) for t in texts], max_new_tokens, **kw)
        out = [self.decode(ids) for ids in new]
        return out[0] if isinstance(prompt, str) else out


# Loading ----------------------------------------------------------------------------------------------------------
def _check_table_shape(table, cfg: ModelConfig) -> None:
    want = (cfg.vocab_size, cfg.num_layers, cfg.num_experts, cfg.d_model)
    if tuple(table.shape) != want:
        raise MoleError(f"the lookup table at {table.path} has shape {tuple(table.shape)}; this model needs {want}")


def _open_table(table_or_dir, expected_fingerprint: str | Callable[[], str], what) -> LookupTable:
    """The table (opened if a location is given), which must have been built from these weights: its fingerprint
    must equal `expected_fingerprint` (or what it returns for the table, asked once the table has opened)."""
    table = table_or_dir if isinstance(table_or_dir, LookupTable) else open_lut(table_or_dir)
    if callable(expected_fingerprint):
        expected_fingerprint = expected_fingerprint(table)
    if table.fingerprint != expected_fingerprint:
        raise MoleError(f"the lookup table at {table.path} was built from another checkpoint than {what} "
                        f"(fingerprint {table.fingerprint[:12]} != {expected_fingerprint[:12]})")
    return table


def checkpoint_fingerprint(path: str | Path, cfg: ModelConfig, table: LookupTable | None = None) -> str:
    """lut.fingerprint of a MoLE training-form checkpoint's table inputs: the table's own when `convert_to_lut`
    recorded in it that it was converted from exactly these parameter files (same paths, sizes and mtimes: no
    expert is read), else computed from the experts layer by layer on the host (convert.fingerprint_checkpoint:
    at most two layers in memory, none on the device). Nothing is written into the checkpoint."""
    if table is not None and (table.meta.get("source") or {}).get("params_files") == checkpoint.params_signature(path):
        return table.fingerprint
    return fingerprint_checkpoint(path, cfg)[0]


def load(path: str | Path, lut=None, lut_placement: str = "device", *, offload_experts: bool = False,
         overlap: bool = True, device_rows: int | None = None, device_tier_bytes: int | None = None,
         token_counts=None, speculate: bool = True, host_read: str = "program", storage_read: str = "auto",
         steps_per_dispatch: int | None = None, prefill_rows_bytes: int = PREFILL_ROWS_BYTES) -> LanguageModel:
    """Load a checkpoint (a run directory = its latest step, a checkpoints directory, or a step directory).

    lut: MoLE only: a lookup table directory (or an opened table) to decode with, in inference form: the routed
        experts never reach the device. An inference-form checkpoint (imported from the authors' `moe_table`)
        uses RUN_DIR/lut by default. The table must have been built from this checkpoint's weights: checked
        against the parameter files the table records it was converted from (no expert is read), else against the
        fingerprint computed from the experts (`checkpoint_fingerprint`). Nothing is written into the checkpoint.
    lut_placement: where the table lives while decoding: "device", "host" (RAM) or "storage" (disk).
    offload_experts: MoE only: keep the routed experts in host memory (the paper's offloading baseline).
    host_read: the host placement's reads: "program" (the compiled step reads host memory; default) or "gather"
        (the host gathers each step's rows and puts them).
    storage_read: the storage placement's reads: "auto" (default: the files mapped on the CPU backend, batched
        Tensorstore reads elsewhere), "mapped" or "batched".
    steps_per_dispatch: decode steps per dispatch when the program reads every row itself (see decoder.Decoder).
    prefill_rows_bytes: with a table, the bound on a prefill chunk's rows and on a mapped table's resident pages
        (see decoder.Decoder).
    overlap: a table the host fetches for: overlap the row fetch with block 0 (default; see decoder.Decoder).
    device_rows / device_tier_bytes: a table the host fetches for: keep the rows of this many of the most frequent
        ids (or as many as fit these bytes) on the device, ordered by token_counts (see `device_tier`); speculate:
        see decoder.Decoder.
    """
    if lut_placement not in PLACEMENTS:
        raise MoleError(f"unknown LUT placement {lut_placement!r}: use one of {', '.join(PLACEMENTS)}")
    meta = checkpoint.read_meta(path)
    ref = checkpoint.locate(path)
    cfg = ModelConfig.from_dict(meta["model_config"])
    kw = dict(placement=lut_placement, offload_experts=offload_experts, overlap=overlap, run_dir=ref.run_dir,
              speculate=speculate, host_read=host_read, storage_read=storage_read,
              steps_per_dispatch=steps_per_dispatch, prefill_rows_bytes=prefill_rows_bytes)
    tier = dict(device_rows=device_rows, device_tier_bytes=device_tier_bytes, token_counts=token_counts)
    if (device_rows is not None or device_tier_bytes is not None) and (cfg.kind != "mole" or lut is None and
                                                                        meta.get("has_experts", True)):
        raise MoleError("a device tier (device_rows, device_tier_bytes) is for MoLE's lookup table: pass lut=LUT_DIR")
    if cfg.kind != "mole":
        if lut is not None:
            raise MoleError(f"{ref.path} is a {cfg.kind} model; a lookup table is only for MoLE")
        _, params = checkpoint.restore_params(path, cfg=cfg, as_numpy=offload_experts)
        return LanguageModel(cfg, params, **kw)
    if not meta.get("has_experts", True):
        if lut is None:
            if ref.run_dir is None or not (ref.run_dir / checkpoint.LUT).exists():
                where = ref.run_dir / checkpoint.LUT if ref.run_dir else "its run directory"
                raise MoleError(f"{ref.path} is MoLE's inference form and needs its lookup table, but {where} is "
                                "missing; pass lut=LUT_DIR (--lut)")
            lut = ref.run_dir / checkpoint.LUT
        table = _open_table(lut, meta.get("lut_fingerprint", ""), ref.path)
        _, params = checkpoint.restore_params(path, cfg=cfg, with_experts=False)
        return LanguageModel(cfg, params, table=table, tier_K=device_tier(table, ref.run_dir, **tier), **kw)
    if lut is None:
        _, params = checkpoint.restore_params(path, cfg=cfg)
        return LanguageModel(cfg, params, **kw)
    table = _open_table(lut, lambda opened: checkpoint_fingerprint(ref.path, cfg, opened), ref.path)
    _, params = checkpoint.restore_params(path, cfg=cfg, with_experts=False)
    return LanguageModel(cfg, params, table=table, tier_K=device_tier(table, ref.run_dir, **tier), **kw)
