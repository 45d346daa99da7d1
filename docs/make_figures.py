"""The model behind docs/graph_mlp.svg and docs/report_mlp.html; regenerate them with

    dpcompile inspect docs/make_figures.py:TinyMLP --input-shape 8,10 --option sample_rate=0.01 --option dataset_size=800 \
        --svg docs/graph_mlp.svg --html docs/report_mlp.html
"""
import torch.nn as nn
import torch.nn.functional as F


class TinyMLP(nn.Module):
    def __init__(self, d_in: int = 10, hidden: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, hidden), nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))
