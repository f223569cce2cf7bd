"""``lightning-kd prepare``: tokenise corpora once into LitData shards (not a Trainer run, so not LightningCLI)."""

from __future__ import annotations

from lightning_kd.datamodules.prepare import prepare


def prepare_main(args: list[str]) -> None:
    """``lightning-kd prepare --output DIR --tokenizer NAME [--sources ...] [--max_length N] [--num_workers N]
    [--lm mlm|causal]`` (``causal``: blocks for decoder LMs, documents joined by the end-of-text token)."""
    from jsonargparse import CLI

    try:
        manifest = CLI(prepare, args=args, as_positional=False, prog="lightning-kd prepare")
    except (
        ValueError
    ) as error:  # PreparedDataError, DataSourceError and bad arguments: the message is the help
        raise SystemExit(f"lightning-kd prepare: {error}") from None
    for entry in manifest["sources"]:
        print(
            f"{entry['folder']}: {entry['tokens']:,} tokens in {entry['blocks']:,} blocks from "
            f"{entry['documents']:,} documents ({entry['share']:.1%} of the tokens)"
        )
