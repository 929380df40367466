"""What `offbatch run --ray ADDRESS / --workers N` hands the runner in place of engine/select.make_generator."""

from __future__ import annotations


def scaled_generator(address: str | None, workers: int | None, device: str | None, progress, split: int = 1):
    """make_generator's stand-in: called by the runner (timed as the model's load) only when there is work
    left, it connects to Ray and returns a ClusterGenerator whose workers have all loaded the model."""
    from offbatch.scale.cluster import Cluster

    cluster = Cluster(address, workers, device, notify=progress.warn, split=split)  # options checked now, before any reading

    def make(model_dir, tokenizer, options):
        from offbatch.scale.generator import ClusterGenerator

        return ClusterGenerator(cluster, model_dir, tokenizer, options, progress)

    return make
