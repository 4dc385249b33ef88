"""A small trained byte-level GPT in the training checkpoint format, for serving tests.

Trained for a few hundred steps on this repository's calibration prose so that it has a real
perplexity (well below a uniform model's) and int8 has something to lose; seconds on a CPU.

Its ``hybridray.json`` is signed with the cluster's key when ``cluster`` is given, as a
training run of that cluster signs it. Unsigned metadata is read at the cluster's default
class (restricted in the shipped files), so a checkpoint of a lower class that a test serves
at a less trusted site must be signed by the cluster that serves it.
"""

from __future__ import annotations

from pathlib import Path


def make_checkpoint(directory: str | Path, *, data_class: str = "restricted",
                    site: str = "onprem", steps: int = 300, size: str = "tiny",
                    seed: int = 0, cluster: str | None = None,
                    home: str | Path | None = None) -> Path:
    """Train and save the checkpoint; ``cluster`` (in ``home``, default $HYBRIDRAY_HOME)
    signs its metadata with that cluster's key, as ``hybridray train`` does."""
    import torch

    from hybridray.serve import calibration
    from hybridray.storage.secrets import ClusterSecrets
    from hybridray.topology.models import DataClass
    from hybridray.train.checkpoint import save_checkpoint
    from hybridray.train.model import EOT, GPT

    if cluster is None and DataClass(data_class) < DataClass.restricted:
        raise ValueError(f"a {data_class} checkpoint must be signed to be read as {data_class}"
                         ": give cluster= (and home=) of the cluster that serves it")

    torch.manual_seed(seed)
    model = GPT.from_size(size)
    text = (calibration.PROSE + " " + " ".join(calibration.SENTENCES)).encode()
    data = torch.tensor([EOT, *text] * 4)
    block = model.config.block_size
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - block - 1, (8,))
        x = torch.stack([data[s:s + block] for s in starts])
        y = torch.stack([data[s + 1:s + block + 1] for s in starts])
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return save_checkpoint(directory, model, optimizer={"optimizer": opt.state_dict()},
                           state={"step": steps, "loss": float(loss.detach())},
                           meta={"data_class": data_class, "site": site, "tokenizer": "bytes"},
                           signing_key=ClusterSecrets(cluster, home).signing_key()
                           if cluster else None)
