"""train: fine-tune a sequence classifier on the pretrained encoder with `train.strategy`, keep the best epoch.

Reads:  params.yaml (base, train, mlflow), <data>/{train,val}.parquet, <labels> (label map),
        <search> (the search stage's best params, laid over `train` when the search was enabled)
Writes: <out>/ (save_pretrained folder: safetensors, config with label maps, tokenizer; for lora the
        adapters merged in), <adapter>/ (lora: the unmerged peft adapter; otherwise adapter.json saying
        there is none), <report> (best val scores, timings, parameter counts, augmented rows, phases,
        MLflow run id), <metrics> (its headline figures, the DVC metrics), <history> (per-epoch CSV, a DVC plot)
Keeps:  <checkpoints>/<key>/ while training (key = hash of params and inputs), so that a killed run
        resumes from its last epoch on the next run; deleted once the outputs are written.
Logs:   an MLflow run with the params, per-step loss/lr, per-epoch val metrics, per-phase metrics
        (gradual unfreezing, step = phase) and the final model.
Runs:   with train.distributed asking for several processes, relaunches itself under torchrun (DDP);
        only rank 0 writes and logs (docs/distributed.md).
"""

from lmpipe.runner import paths_of, run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--data", required=True, help="folder with train.parquet and val.parquet")
    parser.add_argument("--labels", required=True, help="labels.json from prepare")
    parser.add_argument("--search", required=True, help="best_params.json from the search stage")
    parser.add_argument("--out", required=True, help="model folder to write")
    parser.add_argument("--adapter", required=True, help="folder for the unmerged LoRA adapter")
    parser.add_argument("--checkpoints", required=True, help="resumable checkpoints (not a DVC output)")
    parser.add_argument("--metrics", required=True, help="headline figures (DVC metrics JSON)")
    parser.add_argument("--report", required=True, help="the training summary (JSON)")
    parser.add_argument("--history", required=True, help="per-epoch history (CSV plot)")
    args = parser.parse_args()

    from lmpipe.params import load_params, search_overrides

    params = load_params(args.params, overrides=search_overrides(args.search))  # before the heavy imports
    from lmpipe.stages import train

    print(train.run(params, paths_of(train.Paths, args)))


if __name__ == "__main__":
    run_stage(main)
