"""Packing, validation split, the massive-activation guard and the shuffle buffer."""

from __future__ import annotations

import io
import itertools

import pytest
import torch

from datamodules import LMActivationDataModule
from datamodules.activation_stream import NormGuard, shuffled_batches
from datamodules.text import is_validation_document, pack_contexts, packed_contexts, select_documents


def test_contexts_start_with_bos_and_keep_every_token_in_order():
    documents = [[10, 11, 12], [20, 21], [30, 31, 32, 33, 34]]
    contexts = list(pack_contexts(documents, context_length=4, bos_id=1, separator_id=2))
    assert all(len(c) == 4 and c[0] == 1 for c in contexts)
    body = [token for c in contexts for token in c[1:]]
    assert body == [10, 11, 12, 2, 20, 21, 2, 30, 31, 32, 33, 34][: len(body)]
    assert len(body) == 12


def test_validation_holds_out_whole_documents_and_ranks_are_disjoint():
    docs = [f"doc {i}" for i in range(1000)]
    val = list(select_documents(docs, validation=True, val_fraction=0.1))
    train = list(select_documents(docs, validation=False, val_fraction=0.1))
    assert set(val).isdisjoint(train) and len(val) + len(train) == 1000
    assert 60 < len(val) < 140
    assert [d for i, d in enumerate(docs) if is_validation_document(i, 0.1)] == val
    shards = [list(select_documents(docs, validation=False, val_fraction=0.1, rank=r, world_size=2)) for r in (0, 1)]
    assert set(shards[0]).isdisjoint(shards[1]) and sorted(shards[0] + shards[1]) == sorted(train)


def test_norm_guard_drops_massive_and_nonfinite_tokens():
    torch.manual_seed(0)
    guard = NormGuard(multiple=10.0)
    x = torch.randn(1000, 16)
    x[5] *= 100.0
    x[7, 3] = float("nan")
    kept = guard(x)
    assert len(kept) == 998 and guard.dropped_massive == 1 and guard.dropped_nonfinite == 1
    later = torch.randn(10, 16)
    later[0] *= 50.0  # judged against the running median of earlier tokens
    assert len(guard(later)) == 9 and guard.dropped_massive == 2
    assert len(NormGuard(multiple=None)(x)) == 999


def test_shuffle_buffer_emits_full_batches_of_mixed_tokens():
    chunks = [torch.full((100, 1), float(i)) for i in range(20)]
    batches = list(shuffled_batches(iter(chunks), batch_size=50, buffer_tokens=400, generator=torch.Generator().manual_seed(0)))
    assert all(len(b) == 50 for b in batches)
    assert len(batches) * 50 >= 2000 - 400
    first = batches[0].flatten().unique()
    assert len(first) > 1, "a batch should mix tokens from several contexts"


def test_shuffle_buffer_is_concatenate_then_permute_refill_after_refill():
    """The in-place pool equals its definition: every refill, the pending tokens concatenated and permuted by the
    generator's next randperm, the first batches emitted and the rest kept for the next refill."""
    chunks = [torch.randn(int(n), 3, generator=torch.Generator().manual_seed(int(n))) for n in torch.randint(5, 90, (40,))]
    batches = list(shuffled_batches(iter(chunks), batch_size=32, buffer_tokens=256,
                                    generator=torch.Generator().manual_seed(7)))
    generator, expected, pending = torch.Generator().manual_seed(7), [], torch.empty(0, 3)
    for chunk in chunks:
        pending = torch.cat([pending, chunk])
        if len(pending) < 256:
            continue
        pool = pending[torch.randperm(len(pending), generator=generator)]
        emitted = (len(pool) - 128) // 32 * 32
        expected += list(pool[:emitted].split(32))
        pending = pool[emitted:]
    assert len(batches) == len(expected) > 10
    assert all(torch.equal(a, b) for a, b in zip(batches, expected))


def test_embedded_datamodule_drops_bos_and_specials(tiny_llama, text_file):
    data = LMActivationDataModule(model=str(tiny_llama), dataset="json", data_files=str(text_file), layer=1,
                                  context_length=16, lm_batch_size=4, batch_size=64, shuffle_buffer_tokens=128,
                                  val_tokens=100, normalization_tokens=200)
    data.setup()
    chunk = next(data.training_chunks())
    # 4 contexts of 16 tokens: BOS never trained on, separators (EOS) dropped
    assert chunk.shape[1] == 32 and len(chunk) <= 4 * 15
    scale, = data.estimate_scales()
    sample = torch.cat([c for _, c in zip(range(3), data.training_chunks())])
    assert abs(float((sample * scale).pow(2).sum(-1).mean()) / 32 - 1) < 0.2
    assert len(data.held_out_rows()) == 100
    assert sum(len(batch) for batch in data.val_dataloader()) == 100


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_neox"])
def test_spliced_lm_loss_perfect_reconstruction_recovers_everything(family, tiny_llama, text_file, tmp_path):
    """On a Llama-shaped block, a Gemma 2 sandwich-norm block (whose MLP write is a norm's output) and a NeoX
    parallel-residual block: the splice reaches the logits, and a perfect reconstruction changes nothing."""
    from tests.conftest import build_tiny_model

    model = tiny_llama if family == "llama" else build_tiny_model(family, tmp_path / family)
    data = LMActivationDataModule(model=str(model), dataset="json", data_files=str(text_file), layer=1,
                                  context_length=16, val_fraction=0.2)
    data.setup()
    perfect = data.spliced_cross_entropy(lambda x: x, contexts=4)
    assert perfect["ce_sae"] == pytest.approx(perfect["ce_clean"], rel=1e-6)
    assert perfect["ce_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert perfect["ce_zero"] != pytest.approx(perfect["ce_clean"])
    ablated = data.spliced_cross_entropy(torch.zeros_like, contexts=4)
    assert ablated["ce_recovered"] == pytest.approx(0.0, abs=1e-6)
    halfway = data.spliced_cross_entropy(lambda x: 0.5 * x, contexts=4)
    assert halfway["ce_sae"] != pytest.approx(perfect["ce_clean"])  # the replacement really reaches the logits
    assert halfway["ce_delta"] == pytest.approx(halfway["ce_sae"] - halfway["ce_clean"])
    from datamodules.lm_evaluation import LMLossEvaluator

    contexts = data.evaluators[4, "all", 0].input_ids
    one_at_a_time = LMLossEvaluator(data.lm, contexts, chunk=1).evaluate(lambda x: 0.5 * x)
    for key in ("ce_clean", "ce_sae", "ce_zero", "ce_delta"):  # chunking changes nothing but memory (and rounding)
        assert one_at_a_time[key] == pytest.approx(halfway[key], abs=1e-5), key
    # the clean CE is the model's own mean next-token loss over the scored positions
    import transformers

    with torch.no_grad():
        logits = transformers.AutoModelForCausalLM.from_pretrained(model).eval()(contexts).logits
    scored = data.lm.trainable_positions(contexts)[:, 1:]
    direct = torch.nn.functional.cross_entropy(logits[:, :-1][scored], contexts[:, 1:][scored])
    assert perfect["ce_clean"] == pytest.approx(float(direct), rel=1e-5)


class FakeTrainer:
    """Just what the datamodule reads of a trainer to know its rank."""

    world_size = 2

    def __init__(self, rank: int) -> None:
        self.global_rank = rank


@pytest.mark.parametrize("streaming", [False, True])
def test_ranks_read_disjoint_documents_that_cover_the_training_split(streaming, tiny_llama, text_file):
    data = LMActivationDataModule(model=str(tiny_llama), dataset="json", data_files=str(text_file), layer=1,
                                  streaming=streaming, val_fraction=0.1)
    assert data.source.indexable != streaming
    single = list(data.documents(validation=False, pass_index=0))
    shards = []
    for rank in (0, 1):
        data.trainer = FakeTrainer(rank)
        shards.append(list(data.documents(validation=False, pass_index=0)))
    data.trainer = None
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(single)
    assert abs(len(shards[0]) - len(shards[1])) <= 1
    assert not set(single) & set(data.documents(validation=True, pass_index=0))


def test_pretokenized_input_ids_column(tiny_llama, tmp_path):
    import json

    rows = [{"input_ids": list(range(3 + i % 7, 40 + i % 11))} for i in range(60)]
    path = tmp_path / "ids.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    data = LMActivationDataModule(model=str(tiny_llama), dataset="json", data_files=str(path), layer=1,
                                  context_length=16, lm_batch_size=4, val_fraction=0.1)
    data.setup()
    assert data.source.document(0) == rows[0]["input_ids"]
    chunk = next(data.training_chunks())
    assert chunk.shape[1] == 32 and len(chunk) > 0


def test_missing_text_column_names_the_columns(tiny_llama, tmp_path):
    import json

    path = tmp_path / "wrong.jsonl"
    path.write_text("\n".join(json.dumps({"body": "some text"}) for _ in range(5)))
    data = LMActivationDataModule(model=str(tiny_llama), dataset="json", data_files=str(path))
    with pytest.raises(ValueError, match=r"no text column 'text'.*\['body'\]"):
        list(data.source.documents())


def _consume_documents(rank: int, port: int, model: str, data_file: str, queue) -> None:
    """One DDP rank: read this rank's training documents for a pass and gather every rank's set over gloo."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    data = LMActivationDataModule(model=model, dataset="json", data_files=data_file, val_fraction=0.1)
    data.trainer = FakeTrainer(dist.get_rank())
    consumed = sorted(data.documents(validation=False, pass_index=0))
    everyone: list = [None, None]
    dist.all_gather_object(everyone, consumed)
    queue.put((rank, everyone))
    dist.destroy_process_group()


def test_two_gloo_processes_consume_disjoint_documents(tiny_llama, text_file):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_consume_documents, args=(r, port, str(tiny_llama), str(text_file), queue))
                 for r in (0, 1)]
    for process in processes:
        process.start()
    results = dict(queue.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    first, second = results[0]
    assert results[1] == results[0], "both ranks see the same gathered picture"
    assert first and second and not set(first) & set(second)
    assert abs(len(first) - len(second)) <= 1
    single = LMActivationDataModule(model=str(tiny_llama), dataset="json", data_files=str(text_file), val_fraction=0.1)
    assert sorted(first + second) == sorted(single.documents(validation=False, pass_index=0))


def test_take_tokens_stops_at_the_count_and_reads_no_further():
    from datamodules.activation_stream import take_tokens

    read = []

    def chunks():
        for i in range(10):
            read.append(i)
            yield torch.full((4, 2), float(i))

    taken = take_tokens(chunks(), 10)
    assert taken.shape == (10, 2) and taken[-1, 0] == 2 and read == [0, 1, 2]
    assert len(take_tokens(iter([torch.zeros(3, 2)]), 10)) == 3


def test_packed_contexts_resume_from_any_position_without_the_documents_before():
    documents = [list(range(start, start + length)) for start, length in ((0, 5), (100, 23), (200, 2), (300, 40))]
    full = list(packed_contexts(documents, 8, bos_id=-1, separator_id=-2))
    assert [c for c, _, _ in full] == list(pack_contexts(documents, 8, bos_id=-1, separator_id=-2))
    for index, (_, taken, carry) in enumerate(full):
        rest = list(packed_contexts(documents[taken:], 8, bos_id=-1, separator_id=-2, carry=carry))
        assert [c for c, _, _ in rest] == [c for c, _, _ in full[index + 1:]]


def stream_datamodule(tiny_llama, text_file) -> LMActivationDataModule:
    data = LMActivationDataModule(model=str(tiny_llama), dataset="json", data_files=str(text_file), layer=1,
                                  context_length=16, lm_batch_size=4, batch_size=32, shuffle_buffer_tokens=160,
                                  val_tokens=100, normalization_tokens=200)
    data.setup()
    return data


def test_the_live_stream_resumes_bit_for_bit_after_a_buffer_fill_not_a_replay(tiny_llama, text_file):
    """After any number of consumed batches (fills of the buffer emit 2–3 batches, and the reader is one batch
    ahead), a new stream built from `state(consumed)` gives exactly the batches that follow, with LM forwards
    for at most one buffer fill before its first batch, however far the first stream had gone."""
    data = stream_datamodule(tiny_llama, text_file)
    straight = list(itertools.islice(data.training_batches(), 60))  # passes over the 360 training documents
    for consumed in (0, 1, 2, 3, 7, 25, 50):
        first = stream_datamodule(tiny_llama, text_file)
        batches = first.training_batches()
        for _ in range(consumed + 1):  # one ahead, as Lightning's fetcher is
            next(batches)
        state = first.stream.state(consumed)
        saved = io.BytesIO()
        torch.save(state, saved)
        resumed = stream_datamodule(tiny_llama, text_file)
        resumed.resume_state = torch.load(io.BytesIO(saved.getvalue()), weights_only=False)
        forwards = count_calls(resumed.lm, "activations")
        continued = resumed.training_batches()
        following = next(continued)
        assert forwards.count <= 160 // (4 * 15) + 2, f"{forwards.count} LM forwards before the first batch"
        rest = [following, *itertools.islice(continued, 60 - consumed - 1)]
        assert len(rest) == 60 - consumed
        assert all(torch.equal(a, b) for a, b in zip(rest, straight[consumed:])), f"resumed after {consumed}"
        assert len(saved.getvalue()) < 80 * 32 * 4 + 400_000
        ours, theirs = resumed.guard.state_dict(), data.guard.state_dict()  # the guard resumed where it stood too
        assert torch.equal(ours["norms"], theirs["norms"]) and ours["dropped_massive"] == theirs["dropped_massive"]


class count_calls:
    """Counts the calls of `owner.name` from now on."""

    def __init__(self, owner, name: str) -> None:
        self.count, method = 0, getattr(owner, name)

        def counted(*args, **kwargs):
            self.count += 1
            return method(*args, **kwargs)

        setattr(owner, name, counted)


def test_a_streamed_dataset_is_split_at_the_source_so_each_rank_reads_only_its_shards(tiny_llama, tmp_path):
    """Two files, two ranks: each rank's training documents all come from its own file (split_dataset_by_node
    gives whole shards), the held-out documents are the same whatever the rank count, and together the ranks
    train on exactly what one process trains on."""
    import json

    from tests.conftest import sample_texts

    files = []
    for shard in (0, 1):
        path = tmp_path / f"shard{shard}.jsonl"
        path.write_text("\n".join(json.dumps({"text": f"shard{shard} {text}"}) for text in sample_texts(60, seed=shard)))
        files.append(str(path))
    data = LMActivationDataModule(model=str(tiny_llama), dataset="json", data_files=files, streaming=True,
                                  val_fraction=0.2)
    single = list(data.documents(validation=False, pass_index=0))
    held_out = list(data.documents(validation=True, pass_index=0))
    per_rank = []
    for rank in (0, 1):
        data.trainer = FakeTrainer(rank)
        per_rank.append(list(data.documents(validation=False, pass_index=0)))
        assert per_rank[-1] and all(document.startswith(f"shard{rank} ") for document in per_rank[-1])
        assert list(data.documents(validation=True, pass_index=0, every_rank=True)) == held_out
    assert sorted(per_rank[0] + per_rank[1]) == sorted(single)
    assert held_out and not set(held_out) & set(single)


def test_prepare_data_prepares_a_builder_dataset_and_skips_a_local_model(tiny_llama, text_file, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("a local model downloads"))
    data = LMActivationDataModule(model=str(tiny_llama), dataset="json", data_files=str(text_file))
    data.prepare_data()  # the json builder prepares its Arrow cache; the local folder needs no download
    assert len(data.source) == 400


def test_a_checkpointed_half_buffer_is_stored_narrow_only_where_that_is_exact():
    from datamodules.activation_stream import narrowest_exact

    from_bf16 = torch.randn(64, 8).bfloat16().float()  # what a bf16 LM's activations are after .float()
    assert narrowest_exact(from_bf16).dtype == torch.bfloat16
    assert torch.equal(narrowest_exact(from_bf16).float(), from_bf16)
    full = torch.randn(64, 8)
    assert narrowest_exact(full).dtype == torch.float32 and torch.equal(narrowest_exact(full), full)
