"""compress: int8 quantization, magnitude pruning and distillation of the trained model, each measured
against the original with the evaluate stage's code.

Reads:  params.yaml (base, train, compress, mlflow), <data>/{train,val,test}.parquet,
        <model>/ (the trained model: the original and the teacher)
Writes: <out>/int8/ (int8.safetensors + quantization.json recipe, config, tokenizer; load with
        lmpipe.compress.compression.load_int8), <out>/pruned/ and <out>/student/ (save_pretrained folders),
        <report> (one row per variant and the original: val loss against compress.max_loss and the
        within_budget flag, test scores and their change, size, parameters, CPU latency, throughput), <metrics> (each variant's macro-F1 change and batch-1 speed-up, the DVC
        metrics), <plot> (macro-F1 against batch-1 latency, a DVC plot), <prune-curve> (val macro-F1
        against sparsity, a DVC plot)
Logs:   one MLflow parent run with a child run per variant (and the original); the pruning recovery
        fine-tune and the distillation log like a training run.
Runs:   with train.distributed asking for several processes, relaunches itself under torchrun (DDP);
        only rank 0 writes and logs (docs/distributed.md).
"""

from lmpipe.runner import paths_of, run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--data", required=True, help="folder with train/val/test.parquet")
    parser.add_argument("--model", required=True, help="the trained model folder")
    parser.add_argument("--out", required=True, help="folder for the compressed variants")
    parser.add_argument("--metrics", required=True, help="headline figures (DVC metrics JSON)")
    parser.add_argument("--report", required=True, help="the comparison table (JSON)")
    parser.add_argument("--plot", required=True, help="macro-F1 vs latency points (CSV plot)")
    parser.add_argument("--prune-curve", required=True, help="val macro-F1 against sparsity (CSV plot)")
    args = parser.parse_args()

    from lmpipe.params import load_params

    params = load_params(args.params)  # a typo answers here, before the heavy imports below
    from lmpipe.stages import compress

    print(compress.run(params, paths_of(compress.Paths, args)))


if __name__ == "__main__":
    run_stage(main)
