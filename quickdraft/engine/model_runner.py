"""ModelRunner: owns the model, the KV-cache tensors and the device; turns a step's sequences
into flat tensors and attention metadata, runs the forward pass and returns logits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from quickdraft.layers.attention import AttentionMetadata, AttentionSegment, NativeQueries
from quickdraft.models.llama import DecoderForCausalLM

# Sequences computing at most this many tokens in a step share one padded attention batch;
# longer ones (prefills) get a segment each, so that padding never multiplies a prefill.
SHORT_QUERY_TOKENS = 16


@dataclass
class SeqInput:
    token_ids: list[int]  # the tokens computed this step
    start_pos: int  # absolute position of token_ids[0] (= tokens already in the cache)
    block_table: list[int]
    logits_from: int  # logits are returned for token_ids[logits_from:] (len(token_ids) = none)


class ModelRunner:
    def __init__(self, model: DecoderForCausalLM, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        cfg = model.cfg
        self.model = model
        self.device = device
        self.block_size = block_size
        self.sliding_window = cfg.sliding_window
        # [layers, K/V, slots, kv_heads, head_dim]; torch.empty leaves untouched pages unallocated.
        self.kv_cache = torch.empty(cfg.num_hidden_layers, 2, num_blocks * block_size, cfg.num_key_value_heads,
                                    cfg.head_dim, dtype=dtype, device=device)
        self.kv_caches = list(self.kv_cache.unbind(0))
        # With the native decoder stack (CPU float32, see models/llama.py) attention runs inside it.
        self.native = model.native_decoder is not None

    @staticmethod
    def kv_bytes_per_block(model_cfg, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * model_cfg.num_hidden_layers * block_size * model_cfg.num_key_value_heads * model_cfg.head_dim * elem

    def _slots(self, block_table: list[int], positions: np.ndarray) -> np.ndarray:
        table = np.asarray(block_table, dtype=np.int64)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def build_metadata(self, inputs: list[SeqInput]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flat input ids [T], positions [T] and the attention metadata of a step."""
        ids = np.concatenate([np.asarray(s.token_ids, dtype=np.int64) for s in inputs])
        pos_list = [np.arange(s.start_pos, s.start_pos + len(s.token_ids), dtype=np.int64) for s in inputs]
        positions = np.concatenate(pos_list)
        slots = np.concatenate([self._slots(s.block_table, p) for s, p in zip(inputs, pos_list)])
        offsets = np.cumsum([0] + [len(s.token_ids) for s in inputs])
        to_dev = lambda a: torch.from_numpy(a).to(self.device)
        flat = [np.arange(offsets[i], offsets[i + 1], dtype=np.int64) for i in range(len(inputs))]
        if self.native:
            # One kernel for every query, prefill or decode: a query's result is then the same
            # however prompts are chunked and batched.
            segments = [self._native_segment(inputs, pos_list, flat)]
        else:
            segments = self._torch_segments(inputs, pos_list, flat)
        meta = AttentionMetadata(slot_mapping=to_dev(slots), segments=segments)
        return to_dev(ids), to_dev(positions), meta

    def _torch_segments(self, inputs: list[SeqInput], pos_list: list[np.ndarray],
                        flat: list[np.ndarray]) -> list[AttentionSegment]:
        to_dev = lambda a: torch.from_numpy(a).to(self.device)
        segments: list[AttentionSegment] = []
        short = [i for i, s in enumerate(inputs) if len(s.token_ids) <= SHORT_QUERY_TOKENS]
        for i, s in enumerate(inputs):
            if len(s.token_ids) <= SHORT_QUERY_TOKENS:
                continue
            causal_only = s.start_pos == 0 and (self.sliding_window is None or len(s.token_ids) <= self.sliding_window)
            if causal_only:
                segments.append(AttentionSegment(to_dev(flat[i][None]), None, to_dev(flat[i]), None, None))
            else:
                segments.append(self._padded_segment([s], [pos_list[i]], [flat[i]]))
        if short:
            segments.append(self._padded_segment([inputs[i] for i in short], [pos_list[i] for i in short],
                                                 [flat[i] for i in short]))
        return segments

    def _padded_segment(self, seqs: list[SeqInput], positions: list[np.ndarray],
                        flat: list[np.ndarray]) -> AttentionSegment:
        B = len(seqs)
        q_max = max(len(s.token_ids) for s in seqs)
        k_max = max(s.start_pos + len(s.token_ids) for s in seqs)
        token_index = np.zeros((B, q_max), dtype=np.int64)
        valid = np.zeros((B, q_max), dtype=bool)
        kv_slots = np.zeros((B, k_max), dtype=np.int64)
        key_pos = np.arange(k_max, dtype=np.int64)
        mask = np.zeros((B, 1, q_max, k_max), dtype=bool)
        for b, (s, pos, fl) in enumerate(zip(seqs, positions, flat)):
            n, ctx = len(s.token_ids), s.start_pos + len(s.token_ids)
            token_index[b, :n] = fl
            valid[b, :n] = True
            kv_slots[b, :ctx] = self._slots(s.block_table, key_pos[:ctx])
            allowed = key_pos[None, :] <= pos[:, None]  # [n, k_max] causal
            if self.sliding_window is not None:
                allowed &= key_pos[None, :] > pos[:, None] - self.sliding_window
            mask[b, 0, :n] = allowed
            mask[b, 0, n:, 0] = True  # padded queries attend to one key (no NaN); dropped after
        out_index = np.concatenate(flat)
        to_dev = lambda a: torch.from_numpy(a).to(self.device)
        mask_t = None if mask.all() else to_dev(mask)
        return AttentionSegment(to_dev(token_index), to_dev(valid), to_dev(out_index), to_dev(kv_slots), mask_t)

    def _native_segment(self, seqs: list[SeqInput], positions: list[np.ndarray],
                        flat: list[np.ndarray]) -> AttentionSegment:
        max_blocks = max(len(s.block_table) for s in seqs)
        tables = np.zeros((len(seqs), max_blocks), dtype=np.int64)
        for b, s in enumerate(seqs):
            tables[b, :len(s.block_table)] = s.block_table
        query_seq = np.repeat(np.arange(len(seqs), dtype=np.int64), [len(s.token_ids) for s in seqs])
        query_pos = np.concatenate(positions)
        native = NativeQueries(
            query_token=torch.from_numpy(np.concatenate(flat)),
            query_pos=torch.from_numpy(query_pos), query_seq=torch.from_numpy(query_seq),
            block_tables=torch.from_numpy(tables), block_size=self.block_size,
            window=self.sliding_window or 0, max_context=int(query_pos.max()) + 1)
        return AttentionSegment(None, None, None, None, None, native=native)

    @torch.inference_mode()
    def execute(self, inputs: list[SeqInput]) -> torch.Tensor:
        """Run one forward pass; returns float32 logits [N, vocab] for the requested positions,
        sequence by sequence in input order."""
        input_ids, positions, meta = self.build_metadata(inputs)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)  # [T, hidden]
        if all(s.logits_from == 0 for s in inputs):  # decode and verification: every row
            return self.model.compute_logits(hidden)
        rows: list[np.ndarray] = []
        start = 0
        for s in inputs:
            n = len(s.token_ids)
            rows.append(np.arange(start + s.logits_from, start + n, dtype=np.int64))
            start += n
        idx = np.concatenate(rows)
        if idx.size == 0:
            return hidden.new_empty(0, self.model.cfg.vocab_size, dtype=torch.float32)
        return self.model.compute_logits(hidden[torch.from_numpy(idx).to(self.device)])
