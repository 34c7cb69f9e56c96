"""Small in-memory datasets shared by the training tests."""

import torch


class Separable(torch.utils.data.Dataset):
    """Images whose class adds a bright channel: learnable in a few steps."""

    def __init__(self, n: int = 24, classes: int = 3, size: int = 224, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, size, size, generator=g)
        self.labels = torch.arange(n) % classes
        for c in range(classes):
            self.images[self.labels == c, c % 3] += 2.0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}
