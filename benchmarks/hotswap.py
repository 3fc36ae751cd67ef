"""Many adapters on one frozen base: lexlora's registry side by side with plain PEFT, in one run.

    HF_HUB_CACHE=$(realpath ../shared/hf/hub) HF_HUB_OFFLINE=1 python benchmarks/hotswap.py

flan-t5-small shape with random weights, r=8 adapters with an `add` fusion projection (random
non-zero weights, saved in the default float16). Measures, as medians:
  - switching the active adapter with 2 and with 50 adapters loaded;
  - loading an adapter dir with 1 and with 50 already loaded;
  - the same two for PEFT (`PeftModel.load_adapter` / `set_adapter`) on a base of the same shape;
  - memory added per loaded adapter (process RSS) against its file size;
  - a mixed-adapter batch of 32 rows over 4 adapters against a single-adapter batch of 32.
The last line is `RESULT swap_ms=… swap_ms_50=… load_ms=… load_ms_50=… peft_swap_ms=… peft_load_ms=… mixed_ratio=…`.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lexlora.adapters.files import save_adapter
from lexlora.adapters.fingerprint import fingerprint
from lexlora.config import LoraSettings, ModelConfig  # noqa: E402
from lexlora.data.spec import AdapterSpec
from lexlora.model.loading import load_base_model, load_tokenizer
from lexlora.model.lora_model import LexLoraModel, build_lora_config
from lexlora.serving.registry import LexLoRA

MODEL_ID = "google/flan-t5-small"
EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def median(values) -> float:
    return statistics.median(values)


def make_adapters(root: Path, count: int, rank: int, model_config: ModelConfig) -> list[Path]:
    """`count` adapter dirs with random non-zero LoRA and fusion weights, as training would leave."""
    base = load_base_model(model_config)
    tokenizer = load_tokenizer(model_config)
    spec = AdapterSpec(
        input_template="Describe the file {filename}:", target_field="description", lexical_field="filename",
        fusion_mode="add", embedding_model=EMBEDDING_MODEL, embedding_dim=384,
    )
    lora = build_lora_config(LoraSettings(r=rank, alpha=2 * rank, dropout=0.0), "t5", MODEL_ID)
    model = LexLoraModel.create(base, tokenizer, lora, spec)
    meta = {"base": fingerprint(base, model_config), "generation": {"max_new_tokens": 16}}
    trainable = [p for p in model.parameters() if p.requires_grad]
    dirs = []
    for i in range(count):
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for param in trainable:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        dirs.append(save_adapter(model, root / f"adapter-{i:02d}", meta))
    return dirs


def bench_lexlora(dirs: list[Path], model_config: ModelConfig, repeats: int) -> dict[str, float]:
    registry = LexLoRA.from_config(model_config)
    spare = dirs[-1]  # loaded and unloaded to time a load at a given count
    results: dict[str, float] = {}

    registry.load_adapter(dirs[0])
    results["load_ms"] = median([_load_unload(registry, spare) for _ in range(repeats)])
    registry.load_adapter(dirs[1])
    results["swap_ms"] = median([timed_ms(lambda n=n: registry.set_adapter(n)) for n in _alternate(dirs[:2], repeats * 20)])

    gc.collect()
    rss_before = rss_bytes()
    load_times = []
    for path in dirs[2:-1]:
        load_times.append(timed_ms(lambda p=path: registry.load_adapter(p)))
    gc.collect()
    added = len(dirs) - 3
    results["mem_per_adapter_mb"] = (rss_bytes() - rss_before) / added / 1e6
    results["tensor_mb"] = registry.adapters[dirs[0].name].memory_bytes / 1e6
    results["file_mb"] = registry.adapters[dirs[0].name].file_bytes / 1e6
    results["loaded"] = len(registry)
    results["load_ms_50"] = median([_load_unload(registry, spare) for _ in range(repeats)])
    results["swap_ms_50"] = median(
        [timed_ms(lambda n=n: registry.set_adapter(n)) for n in _alternate(dirs[:-1], repeats * 20)]
    )
    results["load_ms_first"] = load_times[0]
    results["load_ms_last"] = load_times[-1]

    # Switching has no deferred cost: a one-row generate right after a switch vs on the same adapter.
    one = {"max_new_tokens": 8, "min_new_tokens": 8}
    registry.set_adapter(dirs[0].name)
    registry.generate(["warm_up.py"], **one)
    same = [timed_ms(lambda: registry.generate(["backup_config.py"], **one)) for _ in range(repeats // 2)]
    switched = []
    for name in _alternate(dirs[1:-1], repeats // 2):
        registry.set_adapter(name)
        switched.append(timed_ms(lambda: registry.generate(["backup_config.py"], **one)))
    results["generate_same_ms"] = median(same)
    results["generate_switched_ms"] = median(switched)

    # Mixed-adapter batch of 32 over 4 adapters vs one adapter for all 32 rows.
    inputs = [f"report_{i:02d}_{kind}.py" for i, kind in enumerate(["backup", "config", "monitor", "sync"] * 8)]
    names = [d.name for d in dirs[:4]]
    mixed = [names[i % 4] for i in range(32)]
    kwargs = {"max_new_tokens": 16, "min_new_tokens": 16, "batch_size": 32}  # same decode length for both
    registry.generate(inputs, adapter=names[0], **kwargs)  # warm-up (embedding cache, allocator)
    registry.generate(inputs, adapter=mixed, **kwargs)
    single_s, mixed_s = [], []
    for _ in range(max(3, repeats // 4)):
        single_s.append(timed_ms(lambda: registry.generate(inputs, adapter=names[0], **kwargs)) / 1000)
        mixed_s.append(timed_ms(lambda: registry.generate(inputs, adapter=mixed, **kwargs)) / 1000)
    results["single_rows_per_s"] = 32 / median(single_s)
    results["mixed_rows_per_s"] = 32 / median(mixed_s)
    results["mixed_ratio"] = results["mixed_rows_per_s"] / results["single_rows_per_s"]
    return results


def _load_unload(registry: LexLoRA, path: Path) -> float:
    elapsed = timed_ms(lambda: registry.load_adapter(path, name="spare"))
    registry.delete_adapter("spare")
    return elapsed


def _alternate(dirs: list[Path], count: int) -> list[str]:
    return [dirs[i % len(dirs)].name for i in range(count)]


def bench_peft(dirs: list[Path], model_config: ModelConfig, repeats: int) -> dict[str, float]:
    from peft import PeftModel

    base = load_base_model(model_config)
    model = PeftModel.from_pretrained(base, str(dirs[0]), adapter_name=dirs[0].name)
    results: dict[str, float] = {}
    spare = dirs[-1]

    def load_unload() -> float:
        elapsed = timed_ms(lambda: model.load_adapter(str(spare), adapter_name="spare"))
        model.delete_adapter("spare")
        return elapsed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about the fusion keys it does not know
        results["peft_load_ms"] = median([load_unload() for _ in range(max(3, repeats // 4))])
        model.load_adapter(str(dirs[1]), adapter_name=dirs[1].name)
        results["peft_swap_ms"] = median([timed_ms(lambda n=n: model.set_adapter(n)) for n in _alternate(dirs[:2], repeats)])
        for path in dirs[2:-1]:
            model.load_adapter(str(path), adapter_name=path.name)
        results["peft_load_ms_50"] = median([load_unload() for _ in range(max(3, repeats // 4))])
        results["peft_swap_ms_50"] = median([timed_ms(lambda n=n: model.set_adapter(n)) for n in _alternate(dirs[:-1], repeats)])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=50, help="adapters loaded for the *_50 figures")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model_config = ModelConfig(name_or_path=MODEL_ID, random_init=True, init_seed=0)

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("LEXLORA_CACHE", str(Path(tmp) / "cache"))
        started = time.perf_counter()
        dirs = make_adapters(Path(tmp), args.adapters + 1, args.rank, model_config)  # +1 spare
        print(f"made {len(dirs)} adapters in {time.perf_counter() - started:.1f} s", flush=True)
        ours = bench_lexlora(dirs, model_config, args.repeats)
        gc.collect()
        peft = bench_peft(dirs, model_config, args.repeats)

    n = args.adapters
    print()
    print(f"flan-t5-small shape (random init), r={args.rank} + add fusion, float16 files, "
          f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    print("| measure (median) | lexlora | plain PEFT |")
    print("|---|---|---|")
    print(f"| switch active adapter, 2 loaded (ms) | {ours['swap_ms']:.4f} | {peft['peft_swap_ms']:.2f} |")
    print(f"| switch active adapter, {n} loaded (ms) | {ours['swap_ms_50']:.4f} | {peft['peft_swap_ms_50']:.2f} |")
    print(f"| load an adapter dir, 1 loaded (ms) | {ours['load_ms']:.1f} | {peft['peft_load_ms']:.1f} |")
    print(f"| load an adapter dir, {n} loaded (ms) | {ours['load_ms_50']:.1f} | {peft['peft_load_ms_50']:.1f} |")
    print(f"| one-row generate (8 tokens) on the same adapter (ms) | {ours['generate_same_ms']:.1f} | - |")
    print(f"| one-row generate right after switching adapter (ms) | {ours['generate_switched_ms']:.1f} | - |")
    print(f"| memory added per adapter, RSS (MB) | {ours['mem_per_adapter_mb']:.2f} | - |")
    print(f"| adapter weights in memory / file (MB) | {ours['tensor_mb']:.2f} / {ours['file_mb']:.2f} | - |")
    print(f"| batch of 32, one adapter (rows/s) | {ours['single_rows_per_s']:.1f} | - |")
    print(f"| batch of 32, 4 adapters mixed (rows/s) | {ours['mixed_rows_per_s']:.1f} | - |")
    print()
    print(
        f"RESULT swap_ms={ours['swap_ms']:.4f} swap_ms_50={ours['swap_ms_50']:.4f} load_ms={ours['load_ms']:.1f} "
        f"load_ms_50={ours['load_ms_50']:.1f} peft_swap_ms={peft['peft_swap_ms']:.2f} "
        f"peft_load_ms={peft['peft_load_ms']:.1f} mixed_ratio={ours['mixed_ratio']:.3f}"
    )


if __name__ == "__main__":
    main()
