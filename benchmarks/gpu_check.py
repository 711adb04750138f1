"""The GPU check: everything this project measures on a lent GPU, in one call of a few minutes.

    python -m benchmarks.gpu_check --out $OUT                 # on the GPU machine (see below for its packages)
    python -m benchmarks.gpu_check --out /tmp/check --quick   # a dry run on CPU, at toy sizes

It writes `<out>/gpu_check.json` (and the step tables' own JSON beside it) and prints a summary:
1. the machine: card, torch and CUDA versions, TF32 and bf16 as set;
2. `benchmarks.sae_step` in fp32 and under bf16 autocast (the peers' steps too where SAELens or sparsify import);
   `benchmarks.chain_floor`: the gated chains eager and compiled (Triton on a GPU) against their memory floor;
3. `sagsae cache --device cuda`: tokens/s of the LM forward writing a cache;
4. a default `fit` of 500 steps in bf16-mixed: tokens/s and peak GPU memory.

On a lent GPU, through the device tool (sized to finish within 8 minutes; it has not run on a GPU yet):

    # once, here: the packages its image lacks, as wheels for its Python 3.12 (1.9 MiB)
    echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
      jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 datasets==5.2.0 dill==0.4.1 \
      multiprocess==0.70.19
    # the run, with carry [".whl"]:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site \
      && PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_check --out $OUT

The GPU machine reaches no package index and the embedded SmolLM2 package (94 MiB) is larger than what a call
carries (64 MiB), so 3 and 4 run on an LM of SmolLM2-135M's shape (576 wide, 30 layers, 9 heads, 3 KV heads)
with random weights and a word-level tokenizer, over generated text: the same compute per token as the real one
(the forward stops at layer 15). SAELens and sparsify are not carried: with their dependencies they exceed what a
call carries, so the step tables there have no peer columns.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import DEVICE, device_name
from tests.conftest import REPO, sample_texts, save_word_tokenizer


def environment() -> dict:
    info = {"device": device_name(), "torch": torch.__version__, "python": platform.python_version(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    if DEVICE.type == "cuda":
        info |= {"cuda": torch.version.cuda, "capability": ".".join(map(str, torch.cuda.get_device_capability())),
                 "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30,
                 "bf16": torch.cuda.is_bf16_supported()}
    return info


def smollm2_shaped_lm(folder: Path, quick: bool) -> Path:
    """A Llama of SmolLM2-135M's shape (or a toy one with `quick`) with random weights, and its tokenizer."""
    import transformers

    tokenizer = save_word_tokenizer(folder)
    shape = (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2) if quick else
             dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3))
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                                      tie_word_embeddings=True, **shape)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def fit_in_process(arguments: list[str], root: Path) -> dict:
    """`sagsae fit` in this process: its wall-clock seconds, the median of its logged training throughput over the
    second half of the run (LM forward included), and the peak memory (GPU: allocated by torch; CPU: resident)."""
    import resource

    from sagsae.commands.train import run
    from tests.test_cli import scalars

    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    run(arguments)
    seconds = time.perf_counter() - started
    throughput = [value for _, value in scalars(root / "lightning_logs" / "version_0")["train/tokens_per_s"]]
    second_half = sorted(throughput[len(throughput) // 2:])
    peak = (torch.cuda.max_memory_allocated() if DEVICE.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"seconds": seconds, "tokens_per_s": second_half[len(second_half) // 2], "peak_memory_gib": peak / 2**30}


def timed(command: list[str], log: Path) -> float:
    """Run a `sagsae` command to completion (its output in `log`); its wall-clock seconds."""
    started = time.perf_counter()
    with log.open("w") as output:
        result = subprocess.run([sys.executable, *command], cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed; its output: {log}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sagsae_gpu_check",
                        help="the LM, cache and fit folders (kept out of --out, whose files the device tool returns)")
    parser.add_argument("--quick", action="store_true", help="toy sizes, for a dry run on CPU")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"environment": environment()}
    print(json.dumps(report["environment"]))

    shape = ["--d_in", "64", "--width", "512", "--batch", "256", "--repeats", "2"] if args.quick else ["--repeats", "10"]
    for precision, extra in (("fp32", []), ("bf16", ["--autocast", "bf16"])):
        table = out / f"sae_step_{precision}.json"
        timed(["-m", "benchmarks.sae_step", *shape, *extra, "--json", str(table)], out / f"sae_step_{precision}.log")
        report[f"sae_step_{precision}_ms"] = {name: seconds * 1e3 for name, seconds in
                                             json.loads(table.read_text())["seconds"].items()}

    chain_shape = ["--d_in", "64", "--width", "512", "--batch", "256", "--rounds", "2"] if args.quick else []
    table = out / "chain_floor.json"
    timed(["-m", "benchmarks.chain_floor", *chain_shape, "--json", str(table)], out / "chain_floor.log")
    report["chain_floor"] = json.loads(table.read_text())["chains"]

    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    lm = smollm2_shaped_lm(work / "lm", args.quick)
    texts = work / "texts.jsonl"
    texts.write_text("\n".join(json.dumps({"text": text}) for text in sample_texts(400 if args.quick else 20_000)))
    data = ["--data.init_args.model", str(lm), "--data.init_args.dataset", "json",
            "--data.init_args.data_files", str(texts), *(["--data.init_args.layer", "2"] if args.quick else [])]
    cache_tokens = 20_000 if args.quick else 1_000_000
    device = "cpu" if args.quick else "cuda"
    seconds = timed(["-m", "sagsae", "cache", "--config", "default", *data, "--train_tokens", str(cache_tokens),
                     "--dtype", "float16", "--device", device, "--out", str(work / "cache")], out / "cache.log")
    cached = json.loads((work / "cache" / "metadata.json").read_text())["train_tokens"]
    report["cache"] = {"tokens": cached, "seconds": seconds, "tokens_per_s": cached / seconds}

    steps, batch = (20, 256) if args.quick else (500, 4096)
    fit = ["fit", "--config", str(REPO / "configs" / "default.yaml"), *data, "--trainer.max_steps", str(steps), "--trainer.val_check_interval",
           str(steps), "--trainer.precision", "bf16-mixed", "--data.init_args.batch_size", str(batch),
           "--trainer.default_root_dir", str(work / "fit")]
    if args.quick:
        fit += ["--model.sae.width", "128", "--data.init_args.shuffle_buffer_tokens", "2048",
                "--data.init_args.normalization_tokens", "1024", "--data.init_args.val_tokens", "512"]
    report["fit_bf16"] = {"steps": steps, "batch": batch, **fit_in_process(fit, work / "fit")}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    fp32, bf16 = report["sae_step_fp32_ms"], report["sae_step_bf16_ms"]
    print(f"sagsae step: fp32 {fp32['sagsae']:.2f} ms (floor/step {fp32['floor'] / fp32['sagsae']:.2f}), "
          f"bf16 {bf16['sagsae']:.2f} ms (floor/step {bf16['floor'] / bf16['sagsae']:.2f})")
    for chain, row in report["chain_floor"].items():
        forms = ", ".join(f"{key.removesuffix('_s')} {row[key] / row['floor_s']:.1f}x" for key in row
                          if key.endswith("_s") and key not in ("floor_s", "compile_s") and row[key] is not None)
        print(f"chain {chain}: floor {row['floor_s'] * 1e3:.2f} ms; {forms} the floor")
    fit = report["fit_bf16"]
    print(f"cache: {report['cache']['tokens_per_s']:,.0f} tokens/s; fit in bf16-mixed: {fit['tokens_per_s']:,.0f} "
          f"tokens/s of training, {fit['seconds']:.0f} s in all, peak {fit['peak_memory_gib']:.2f} GiB")
    print(f"Wrote {out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
