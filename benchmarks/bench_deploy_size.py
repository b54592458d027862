"""Deploy figures of every student at 1000 classes, 224 px: the README's params and MACs table.

Prints one JSON object: per rep model, the stock architecture it deploys as (`to_stock`), that model's
parameter count (what timm or torchvision report for it: its BN layers stay separate) and MACs by
torch's FLOP counter (`count_params_macs`), and the training form's count beside it. Seconds on a CPU.
"""

import argparse
import json

import timm
import torch

from pipeline.models import count_params_macs, stock_model_name, to_stock

MODELS = ("rep_ghostnetv3_050", "rep_ghostnetv3_100", "rep_ghostnetv3_130", "rep_ghostnetv3_160",
          "rep_mobilenetv2_100", "rep_shufflenetv2_100")


def deploy_size(name: str, num_classes: int, size: int) -> dict:
    model = timm.create_model(name, num_classes=num_classes).eval()
    params, macs = count_params_macs(to_stock(model), size)
    return {"stock_model": stock_model_name(name), "params": params, "macs": macs,
            "training_form_params": sum(p.numel() for p in model.parameters())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(json.dumps({name: deploy_size(name, args.num_classes, args.size) for name in MODELS}, indent=1))


if __name__ == "__main__":
    main()
