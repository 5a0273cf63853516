"""`arpipe recipe RECIPE.yaml`: one measured answer to one question, by comparing variants.

A recipe names a question, a metric from `arpipe eval` (e.g. bits_per_dim), one shard command,
one training config, and variants that each add shard options and/or training overrides (an
ordering, a model family, a size). For every variant it shards (variants with the same shard
options share shards), trains on 2 processes through the deepspeed launcher and evaluates,
exactly like `arpipe demo`; then it logs the table of the metric per variant to a parent
MLflow run (one metric `<metric>/<variant>` each, table.md and table.json as artifacts), with
each variant's own run nested under it. See configs/image-orderings.yaml.
"""

import json
import time
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline import ArpipeError
from pipeline.log import LOG


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShardSpec(Spec):
    modality: str
    args: list[str] = []  # `arpipe shard <modality>` options shared by every variant, e.g. --input


class VariantSpec(Spec):
    data: str | None = None  # finished shards to train on instead of the recipe's shard stage
    shard: list[str] = []  # more shard options, e.g. [--ordering, snake]
    config: str | None = None  # another training config than the recipe's
    overrides: list[str] = []  # more training overrides, e.g. [model.name=gru]


class EvalSpec(Spec):
    samples: int = 4
    prompts: int = 4
    prompt_len: int | None = None  # default: the codec's (half an image)


class Recipe(Spec):
    name: str  # the parent run's name and the default output directory runs/<name>
    question: str = ""
    # a key of `arpipe eval`'s results (bits_per_dim, bits_per_byte, bits_per_sample …), or several
    # (one column each; a variant fills those its eval reports, e.g. one per modality)
    metric: str | list[str]
    shard: ShardSpec
    config: str  # the training config every variant starts from
    overrides: list[str] = []  # training overrides for every variant
    eval: EvalSpec = EvalSpec()
    variants: dict[str, VariantSpec] = Field(min_length=2)

    @property
    def metrics(self) -> list[str]:
        return [self.metric] if isinstance(self.metric, str) else self.metric


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
        return Recipe.model_validate(raw)
    except OSError as e:
        raise ArpipeError(f"cannot read recipe {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ArpipeError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    except ValidationError as e:
        err = e.errors()[0]
        raise ArpipeError(f"{path}: {'.'.join(map(str, err['loc'])) or 'recipe'}: {err['msg']}") from None


def markdown_table(recipe: Recipe, rows: list[dict]) -> str:
    """One row per variant; with one metric a column of the gap to the best, with several one
    column each ("—" where a variant's eval has no such number)."""
    metrics = recipe.metrics
    lines = [f"# {recipe.name}", "", recipe.question, "",
             f"| variant | {' | '.join(metrics)} |{' vs best |' if len(metrics) == 1 else ''} shard options "
             f"| overrides | seconds |", "|---|" + "---:|" * (len(metrics) + (len(metrics) == 1)) + "---|---|---:|"]
    best = min(r[metrics[0]] for r in rows) if len(metrics) == 1 else None
    for r in rows:
        values = [f"{r[m]:.4f}" if m in r else "—" for m in metrics]
        if best is not None:
            values.append(f"{r[metrics[0]] - best:+.4f}")
        lines.append(f"| {r['variant']} | {' | '.join(values)} | {' '.join(r['shard'])} | "
                     f"{' '.join(r['overrides'])} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def run_recipe(path: str | Path, out: Path | None = None, steps: int | None = None,
               only: list[str] | None = None) -> list[dict]:
    from pipeline.config import load_config
    from pipeline.tracking import Tracker

    recipe = load_recipe(path)
    if unknown := set(only or []) - set(recipe.variants):
        raise ArpipeError(f"--variants {sorted(unknown)} are not in {path} (it has {sorted(recipe.variants)})")
    variants = {k: v for k, v in recipe.variants.items() if not only or k in only}
    out = Path(out or Path("runs") / recipe.name)
    base = load_config(recipe.config, recipe.overrides)  # fails early on a bad config or override
    parent = Tracker(base.tracking.uri, base.tracking.experiment, run_name=recipe.name)
    parent.log_params({"recipe": str(path), "question": recipe.question, "metric": ",".join(recipe.metrics),
                       "variants": ",".join(variants)})
    parent.log_artifact(path)
    try:
        rows = _run_variants(recipe, variants, out, steps, parent)
    except BaseException:
        parent.close("FAILED")
        raise
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(recipe, rows)
    (out / "table.md").write_text(table)
    (out / "table.json").write_text(json.dumps(rows, indent=1))
    parent.log_artifact(out / "table.md")
    parent.log_artifact(out / "table.json")
    parent.close()
    print(f"\n{table}\nMLflow parent run {parent.run_id}: {parent.url}")
    return rows


def _run_variants(recipe: Recipe, variants: dict[str, VariantSpec], out: Path, steps: int | None, parent) -> list[dict]:
    from pipeline.cli import run as cli
    from pipeline.demo import train_and_eval

    shard_dirs: dict[tuple, Path] = {}
    rows = []
    for name, variant in variants.items():
        LOG.info("recipe %s: variant %s", recipe.name, name)
        args = [*recipe.shard.args, *variant.shard]
        shards = Path(variant.data) if variant.data else shard_dirs.get(tuple(args))
        if shards is None:  # variants with identical shard options (e.g. model families) share shards
            shards = shard_dirs[tuple(args)] = out / "shards" / name
            cli(["shard", recipe.shard.modality, *args, "--out", str(shards)])
        start = time.time()
        result = train_and_eval(Path(variant.config or recipe.config), shards, out / name, steps,
                                overrides=[*recipe.overrides, *variant.overrides], **recipe.eval.model_dump())
        found = {m: result[m] for m in recipe.metrics if m in result}
        if not found:
            raise ArpipeError(f"recipe {recipe.name}: none of the metrics {recipe.metrics} is among eval's results "
                              f"{sorted(k for k, v in result.items() if isinstance(v, float))}")
        rows.append({"variant": name, **found, "shard": ["shards", variant.data] if variant.data else variant.shard,
                     "overrides": variant.overrides, "seconds": time.time() - start, "run_id": result["run_id"]})
        parent.log_metrics({f"{m}/{name}": v for m, v in found.items()}, 0)
        _nest(result, parent.run_id)
    return rows


def _nest(result: dict, parent_id: str) -> None:
    """Show a variant's run under the recipe's run in the MLflow UI. Cosmetic: failures only warn."""
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(result["tracking_uri"]).set_tag(result["run_id"], "mlflow.parentRunId", parent_id)
    except Exception as e:  # tracking must never stop the work
        LOG.warning("could not nest run %s under the recipe's run: %s", result["run_id"], e)
