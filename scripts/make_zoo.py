"""Export Whittle's "model zoo" test fixtures: small real architectures, real exporters.

Run once by hand from the repository root, in a throwaway virtualenv that has
torch, torchvision, onnx, onnxscript, onnxruntime and numpy (torch is NOT a
dependency of the project or its CI; the outputs of this script are committed):

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch torchvision onnx onnxscript onnxruntime numpy
    /tmp/torchvenv/bin/python scripts/make_zoo.py

Everything is written to Tests/Fixtures/zoo/ (the directory is recreated).

The models are the real torchvision classes (or, where torchvision has none,
hand-written modules that follow the reference implementations line by line),
shrunk in width, depth and resolution so that every file stays under 1 MB
(the script refuses files of 2 MB or more, and a zoo of 15 MB or more). Weights are random with fixed seeds (He init, BatchNorm/LayerNorm with
non-trivial random statistics), models are in eval mode, and are then
conditioned like trained networks by a data-dependent LSUV-style pass
(lsuv_normalize): on a fixed batch of 128 standard-normal images (random
token ids for bert_*), layer by layer in forward order, every BatchNorm's
gamma/beta are rescaled so its output has std 1 and mean 0 over the batch and
every Conv/Linear (and attention projection) is scaled to output RMS 1;
LayerNorm gammas are squeezed to 1 +- 0.2. Without it activations grow or
shrink geometrically with depth (|x| ~ 1400 in the LR-ASPP backbone) or the
output stops depending on the input (EfficientNet, YOLOv8).

    family          built from                                              task            input
    mobilenetv3     torchvision mobilenet_v3_small(width_mult=0.25)         classification  3x32x32
    efficientnet    torchvision EfficientNet, efficientnet_b0 conf, w=d=0.25 classification  3x32x32
    shufflenetv2    torchvision ShuffleNetV2([2,2,2], [8,16,32,64,128])     classification  3x32x32
    squeezenet      torchvision SqueezeNet('1_1') with Fire widths / 4      classification  3x32x32
    regnety         torchvision RegNet, small BlockParams with SE (Y type)  classification  3x32x32
    densenet        torchvision DenseNet(growth 8, blocks (2,2,2), 16 init) classification  3x32x32
    resnet50        torchvision ResNet + Bottleneck, [2,1,1,1], planes/8    classification  3x32x32
    convnext        torchvision ConvNeXt, CNBlockConfigs 16/32/64           classification  3x32x32
    vit             torchvision VisionTransformer(32, patch 8, 2 layers,    classification  3x32x32
                    2 heads, hidden 32, mlp 64)
    bert_cls        hand-written HF-BERT-style encoder (vocab 100, seq 16,  classification  input_ids,
                    hidden 32, 2 heads, 2 post-norm layers, erf GELU),                      attention_mask
                    [CLS] tanh pooler + Linear -> logits                                    (int64, Nx16)
    bert_embed      same encoder, masked mean pooling -> [N, 32] embedding  embedding       same
    lraspp          torchvision LRASPP around mobilenet_v3_large(0.25,      segmentation    3x64x64
                    dilated, reduced_tail) via _lraspp_mobilenetv3, head 32 ch
    deeplabv3       torchvision DeepLabV3 + DeepLabHead/ASPP (32 channels,  segmentation    3x64x64
                    rates 2/4/6) on a dilated small Bottleneck ResNet
    fcn             torchvision FCN + FCNHead on a dilated small ResNet     segmentation    3x64x64
    yolov5          hand-written YOLOv5 (Conv-BN-SiLU, C3, SPPF, nearest    detection       3x64x64
                    upsample + Concat PAN neck, Detect in export mode)
    yolov8          hand-written YOLOv8 (C2f with chunk, SPPF, anchor-free  detection       3x64x64
                    decoupled head, DFL, dist2bbox, export mode)

Every family is exported with the TorchScript exporter
(torch.onnx.export(dynamo=False)) at opset 17 with a dynamic batch axis
(NAME = FAMILY_op17); bert_* also get a dynamic sequence axis. Additionally:
FAMILY_dynamo = torch.onnx.export(dynamo=True) at its default opset (written
into MANIFEST.json) for mobilenetv3, vit, bert_cls, bert_embed, yolov8 and
convnext; bert_cls_op13 with the TorchScript exporter at opset 13
(LayerNormalization is decomposed there into ReduceMean/Sub/Pow/Sqrt/Div);
vit_op13 is attempted but fails (nn.MultiheadAttention goes through
aten::scaled_dot_product_attention, exportable only from opset 14), so
vit_op14 is written instead; vit_op20 / bert_cls_op20 at opset 20, the highest
opset the TorchScript exporter supports (native LayerNormalization and Gelu).
Failures of the dynamo and extra-opset exports are recorded in the manifest
("exporter_failures") instead of stopping the script; opset 17 must succeed.

For every NAME.onnx there is NAME.ort_output.npy (first graph output from
onnxruntime's CPUExecutionProvider on the file as written) and either
NAME.input.npy (image models: float32 standard normal, batch 2, numpy
default_rng(seed)) or, for bert_*, NAME.inputs.npz holding int64 "input_ids"
in [0, 100) and int64 "attention_mask" (row 0 all ones, row 1 with 5 trailing
zeros; ids are 1 at position 0 and 0 where the mask is 0, like a tokenizer's
[CLS] and [PAD]). The export trace uses a different batch size (3) so the fixtures
exercise the dynamic batch axis. Every file is checked with onnx.checker, run
with onnxruntime, and compared against PyTorch (max |ort - torch| relative to
max |torch| must be <= 1e-4; the figure is in the manifest).

A verification pass then quantizes every file with onnxruntime's own static
quantizer (quant_pre_process on a copy with the batch axis fixed to 1, then
quantize_static: QDQ, QInt8 activations and weights, MinMax, per-channel;
calibrated on 16 inputs from seed 1, evaluated on 8 from seed 2; bert_* with a
two-input reader) and records ort_int8_rel_rmse = sqrt(mean((y_q - y_f)^2)) /
sqrt(mean(y_f^2)) of the first output, output_input_dependence (std of y_f over
the evaluation inputs / RMS), max_abs_activation (largest |x| over all runtime
tensors on the calibration batch), the same figures for the unconditioned
weights ("before_normalization"), and, above 0.05, a diagnosis (widest
tensors, where the error is injected, per-quantization-point step noise).

MANIFEST.json lists the tool versions and, per model: file, family, task,
exporter, opset, inputs/outputs (name, shape, dtype), sorted op_types (with
domain if not the default one), op counts, parameter counts, file size and the
ort-vs-torch error. At the top level "op_types_all" is the union over the zoo
and "not_yet_supported" maps every op type outside Whittle's supported set to
the files using it and every distinct way it is used (attributes, input
dtypes and ranks, constant inputs with their values when small, and how many
nodes have only constant inputs and could be folded, or only constant and
Shape-derived inputs, i.e. are fixed once the input shapes are).
"supported_op_usages" gives the same inventory, without constant values, for
the ops Whittle already supports.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torchvision
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torchvision.models import convnext as tv_convnext
from torchvision.models import efficientnet as tv_efficientnet
from torchvision.models import regnet as tv_regnet
from torchvision.models import resnet as tv_resnet
from torchvision.models import shufflenetv2 as tv_shufflenet
from torchvision.models import squeezenet as tv_squeezenet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation import deeplabv3 as tv_deeplab
from torchvision.models.segmentation import fcn as tv_fcn
from torchvision.models.segmentation import lraspp as tv_lraspp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import he_init  # noqa: E402  (the same He initialisation as the model fixtures)

OUT_DIR = os.path.join("Tests", "Fixtures", "zoo")
BATCH = 2          # batch of the stored fixture inputs
TRACE_BATCH = 3    # batch used while exporting, so the fixtures exercise the dynamic axis
MAX_FILE_BYTES = 2 * 1024 * 1024
MAX_ZOO_BYTES = 15 * 1024 * 1024
REL_TOL = 1e-4

# The op set Whittle supports; everything else found in the zoo is inventoried.
SUPPORTED_OPS = {
    "Conv", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "BatchNormalization",
    "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish",
    "Tanh", "Softmax", "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean",
    "Flatten", "Reshape", "Transpose", "Concat", "Identity", "Dropout", "Pad",
    "Squeeze", "Unsqueeze", "Constant", "Shape", "Gather", "Resize",
    "QuantizeLinear", "DequantizeLinear", "Cast", "ConstantOfShape", "Slice",
}

BERT_VOCAB, BERT_SEQ, BERT_HIDDEN = 100, 16, 32


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def randomize_bn(model: nn.Module, seed: int) -> None:
    """Give every BatchNorm non-trivial affine parameters and running stats,
    and every LayerNorm non-trivial gamma/beta."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) * 1.0 + 0.5)          # gamma in [0.5, 1.5]
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)                 # beta
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)     # var in [0.5, 2.0]
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                shape = m.weight.shape
                m.weight.copy_(torch.rand(shape, generator=g) * 1.0 + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(shape, generator=g) * 0.2)


def make_input(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def make_bert_inputs(seed: int, batch: int = BATCH, seq: int = BERT_SEQ) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, BERT_VOCAB, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    for row in range(1, batch):            # row 0 full length, the others padded
        valid = max(2, seq - 5 * row)
        mask[row, valid:] = 0
        ids[row, valid:] = 0               # [PAD] = 0, like a tokenizer would write
    ids[:, 0] = 1                          # a [CLS]-like first token
    return {"input_ids": ids, "attention_mask": mask}


class FirstOutput(nn.Module):
    """Returns model(x)["out"] for torchvision segmentation models (dict outputs)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


# ---------------------------------------------------------------------------
# torchvision models, shrunk
# ---------------------------------------------------------------------------

def build_mobilenetv3():
    return torchvision.models.mobilenet_v3_small(width_mult=0.25, num_classes=10)


def build_efficientnet():
    setting, last_channel = tv_efficientnet._efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)
    return tv_efficientnet.EfficientNet(setting, dropout=0.2, stochastic_depth_prob=0.2, num_classes=10,
                                       last_channel=last_channel)


def build_shufflenetv2():
    return tv_shufflenet.ShuffleNetV2([2, 2, 2], [8, 16, 32, 64, 128], num_classes=10)


def build_squeezenet():
    """squeezenet1_1 with every width divided by 4 (Fire is torchvision's class)."""
    Fire = tv_squeezenet.Fire
    m = tv_squeezenet.SqueezeNet("1_1", num_classes=10)
    m.features = nn.Sequential(
        nn.Conv2d(3, 16, kernel_size=3, stride=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        Fire(16, 4, 16, 16),
        Fire(32, 4, 16, 16),
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        Fire(32, 8, 32, 32),
        Fire(64, 8, 32, 32),
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        Fire(64, 12, 48, 48),
        Fire(96, 12, 48, 48),
        Fire(96, 16, 64, 64),
        Fire(128, 16, 64, 64),
    )
    m.classifier = nn.Sequential(nn.Dropout(p=0.5), nn.Conv2d(128, 10, kernel_size=1), nn.ReLU(inplace=True),
                                 nn.AdaptiveAvgPool2d((1, 1)))
    return m


def build_regnety():
    """regnet_y_400mf's recipe (group width 8, SE ratio 0.25) with a tiny width/depth schedule."""
    params = tv_regnet.BlockParams.from_init_params(depth=4, w_0=16, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25)
    return tv_regnet.RegNet(params, num_classes=10, stem_width=16)


def build_densenet():
    return torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2, 2), num_init_features=16, bn_size=2,
                                       num_classes=10)


def small_resnet(layers, planes, stem=16, replace_stride_with_dilation=None, num_classes=10,
                 block=tv_resnet.Bottleneck) -> tv_resnet.ResNet:
    """torchvision ResNet with narrower stem/stages.

    ResNet's constructor hard-codes 64/128/256/512 planes; the stem, stages and
    fc are rebuilt with the class's own _make_layer so the blocks, dilation
    handling and forward() are torchvision's.
    """
    rswd = replace_stride_with_dilation or [False, False, False]
    m = tv_resnet.ResNet(block, layers, num_classes=num_classes, replace_stride_with_dilation=rswd)
    m.inplanes, m.dilation = stem, 1
    m.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
    m.bn1 = nn.BatchNorm2d(stem)
    m.layer1 = m._make_layer(block, planes[0], layers[0])
    m.layer2 = m._make_layer(block, planes[1], layers[1], stride=2, dilate=rswd[0])
    m.layer3 = m._make_layer(block, planes[2], layers[2], stride=2, dilate=rswd[1])
    m.layer4 = m._make_layer(block, planes[3], layers[3], stride=2, dilate=rswd[2])
    m.fc = nn.Linear(planes[3] * block.expansion, num_classes)
    return m


def build_resnet50():
    return small_resnet([2, 1, 1, 1], [8, 16, 32, 64])


class ConvNeXtSmall(tv_convnext.ConvNeXt):
    def after_init(self):
        # torchvision initialises layer_scale to 1e-6, which would hide the
        # residual branches entirely; use trained-looking values instead.
        g = torch.Generator().manual_seed(77)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, tv_convnext.CNBlock):
                    m.layer_scale.copy_(torch.rand(m.layer_scale.shape, generator=g) * 0.5 + 0.25)


def build_convnext():
    C = tv_convnext.CNBlockConfig
    return ConvNeXtSmall([C(16, 32, 1), C(32, 64, 1), C(64, None, 2)], num_classes=10)


class ViTSmall(torchvision.models.VisionTransformer):
    def after_init(self):
        g = torch.Generator().manual_seed(78)
        with torch.no_grad():
            self.class_token.copy_(torch.randn(self.class_token.shape, generator=g) * 0.5)
            self.encoder.pos_embedding.copy_(torch.randn(self.encoder.pos_embedding.shape, generator=g) * 0.5)


def build_vit():
    return ViTSmall(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                    num_classes=10)


def build_lraspp():
    backbone = torchvision.models.mobilenet_v3_large(width_mult=0.25, dilated=True, reduced_tail=True)
    model = tv_lraspp._lraspp_mobilenetv3(backbone, num_classes=3)
    # same head class, 32 instead of 128 intermediate channels
    head = model.classifier
    model.classifier = tv_lraspp.LRASPPHead(head.low_classifier.in_channels, head.cbr[0].in_channels, 3, 32)
    return FirstOutput(model)


def build_deeplabv3():
    r = small_resnet([1, 1, 1, 1], [8, 16, 24, 32], replace_stride_with_dilation=[False, True, True])
    backbone = IntermediateLayerGetter(r, return_layers={"layer4": "out"})
    in_ch, width = 32 * tv_resnet.Bottleneck.expansion, 32
    head = tv_deeplab.DeepLabHead(in_ch, 3, atrous_rates=(2, 4, 6))
    # DeepLabHead hard-codes 256 channels (2.4 MB for one 3x3 conv); same
    # structure with torchvision's ASPP at 32 channels.
    head[0] = tv_deeplab.ASPP(in_ch, (2, 4, 6), out_channels=width)
    head[1] = nn.Conv2d(width, width, 3, padding=1, bias=False)
    head[2] = nn.BatchNorm2d(width)
    head[4] = nn.Conv2d(width, 3, 1)
    return FirstOutput(tv_deeplab.DeepLabV3(backbone, head))


def build_fcn():
    r = small_resnet([1, 1, 1, 1], [8, 16, 24, 32], replace_stride_with_dilation=[False, True, True])
    backbone = IntermediateLayerGetter(r, return_layers={"layer4": "out"})
    return FirstOutput(tv_fcn.FCN(backbone, tv_fcn.FCNHead(32 * tv_resnet.Bottleneck.expansion, 3)))


# ---------------------------------------------------------------------------
# YOLOv5 / YOLOv8 (after ultralytics' models/common.py, yolo.py, nn/modules)
# ---------------------------------------------------------------------------

def autopad(k, p=None):
    return k // 2 if p is None else p


class YConv(nn.Module):
    """Conv2d(bias=False) + BatchNorm2d(eps=1e-3) + SiLU, as ultralytics' Conv."""

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=0.001, momentum=0.03)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Y5Bottleneck(nn.Module):
    def __init__(self, c1, c2, shortcut=True, e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = YConv(c1, c_, 1, 1)
        self.cv2 = YConv(c_, c2, 3, 1)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C3(nn.Module):
    def __init__(self, c1, c2, n=1, shortcut=True, e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = YConv(c1, c_, 1, 1)
        self.cv2 = YConv(c1, c_, 1, 1)
        self.cv3 = YConv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Y5Bottleneck(c_, c_, shortcut, e=1.0) for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    def __init__(self, c1, c2, k=5):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = YConv(c1, c_, 1, 1)
        self.cv2 = YConv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Y5Detect(nn.Module):
    """YOLOv5 v7.0 Detect with export=True: grids precomputed for a fixed image size."""

    ANCHORS = ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326))

    def __init__(self, nc, ch, strides, img):
        super().__init__()
        self.nc, self.no, self.nl, self.na = nc, nc + 5, len(ch), len(self.ANCHORS[0]) // 2
        self.m = nn.ModuleList(nn.Conv2d(x, self.no * self.na, 1) for x in ch)
        self.stride = list(strides)
        for i, s in enumerate(strides):
            ny = nx = img // s
            yv, xv = torch.meshgrid(torch.arange(ny, dtype=torch.float32), torch.arange(nx, dtype=torch.float32),
                                    indexing="ij")
            grid = torch.stack((xv, yv), 2).expand(1, self.na, ny, nx, 2) - 0.5
            anchor_grid = torch.tensor(self.ANCHORS[i], dtype=torch.float32).view(1, self.na, 1, 1, 2)
            self.register_buffer(f"grid{i}", grid.contiguous(), persistent=False)
            self.register_buffer(f"anchor_grid{i}", anchor_grid.expand(1, self.na, ny, nx, 2).contiguous(),
                                 persistent=False)

    def forward(self, x):
        z = []
        for i in range(self.nl):
            x[i] = self.m[i](x[i])
            bs, _, ny, nx = x[i].shape
            x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            xy, wh, conf = x[i].sigmoid().split((2, 2, self.nc + 1), 4)
            xy = (xy * 2 + getattr(self, f"grid{i}")) * self.stride[i]
            wh = (wh * 2) ** 2 * getattr(self, f"anchor_grid{i}")
            y = torch.cat((xy, wh, conf), 4)
            z.append(y.view(bs, self.na * nx * ny, self.no))
        return torch.cat(z, 1)


class YOLOv5(nn.Module):
    """yolov5n.yaml layout (depth 0.33) with widths 8/16/24/48/64."""

    def __init__(self, nc=3, img=64, w=(8, 16, 24, 48, 64)):
        super().__init__()
        w1, w2, w3, w4, w5 = w
        self.b0 = YConv(3, w1, 6, 2, 2)           # P1/2
        self.b1 = YConv(w1, w2, 3, 2)             # P2/4
        self.b2 = C3(w2, w2, 1)
        self.b3 = YConv(w2, w3, 3, 2)             # P3/8
        self.b4 = C3(w3, w3, 2)
        self.b5 = YConv(w3, w4, 3, 2)             # P4/16
        self.b6 = C3(w4, w4, 3)
        self.b7 = YConv(w4, w5, 3, 2)             # P5/32
        self.b8 = C3(w5, w5, 1)
        self.b9 = SPPF(w5, w5, 5)
        self.h10 = YConv(w5, w4, 1, 1)
        self.up = nn.Upsample(None, 2, "nearest")
        self.h13 = C3(2 * w4, w4, 1, False)
        self.h14 = YConv(w4, w3, 1, 1)
        self.h17 = C3(2 * w3, w3, 1, False)       # P3 out
        self.h18 = YConv(w3, w3, 3, 2)
        self.h20 = C3(2 * w3, w4, 1, False)       # P4 out
        self.h21 = YConv(w4, w4, 3, 2)
        self.h23 = C3(2 * w4, w5, 1, False)       # P5 out
        self.detect = Y5Detect(nc, (w3, w4, w5), (8, 16, 32), img)

    def forward(self, x):
        x = self.b2(self.b1(self.b0(x)))
        p3 = self.b4(self.b3(x))
        p4 = self.b6(self.b5(p3))
        x = self.b9(self.b8(self.b7(p4)))
        h10 = self.h10(x)
        x = self.h13(torch.cat((self.up(h10), p4), 1))
        h14 = self.h14(x)
        o3 = self.h17(torch.cat((self.up(h14), p3), 1))
        o4 = self.h20(torch.cat((self.h18(o3), h14), 1))
        o5 = self.h23(torch.cat((self.h21(o4), h10), 1))
        return self.detect([o3, o4, o5])


class Y8Bottleneck(nn.Module):
    def __init__(self, c1, c2, shortcut=True, k=(3, 3), e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = YConv(c1, c_, k[0], 1)
        self.cv2 = YConv(c_, c2, k[1], 1)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C2f(nn.Module):
    def __init__(self, c1, c2, n=1, shortcut=False, e=0.5):
        super().__init__()
        self.c = int(c2 * e)
        self.cv1 = YConv(c1, 2 * self.c, 1, 1)
        self.cv2 = YConv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Y8Bottleneck(self.c, self.c, shortcut, k=(3, 3), e=1.0) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class DFL(nn.Module):
    """Distribution focal loss integral: softmax over reg_max bins, 1x1 conv with weights 0..reg_max-1."""

    def __init__(self, c1=16):
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        self.c1 = c1
        self.set_weights()

    def set_weights(self):
        with torch.no_grad():
            self.conv.weight.copy_(torch.arange(self.c1, dtype=torch.float32).view(1, self.c1, 1, 1))

    def forward(self, x):
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)


class Y8Detect(nn.Module):
    """ultralytics Detect head in export mode (format="onnx"): anchors precomputed for a fixed image size."""

    def __init__(self, nc, ch, strides, img, reg_max=16, hidden=16):
        super().__init__()
        self.nc, self.nl, self.reg_max = nc, len(ch), reg_max
        self.no = nc + reg_max * 4
        c2, c3 = hidden, max(hidden, min(nc, 100))
        self.cv2 = nn.ModuleList(nn.Sequential(YConv(x, c2, 3), YConv(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1))
                                 for x in ch)
        self.cv3 = nn.ModuleList(nn.Sequential(YConv(x, c3, 3), YConv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for x in ch)
        self.dfl = DFL(reg_max)
        anchor_points, stride_tensor = [], []
        for s in strides:  # make_anchors(feats, strides, 0.5)
            h = w = img // s
            sx = torch.arange(w, dtype=torch.float32) + 0.5
            sy = torch.arange(h, dtype=torch.float32) + 0.5
            sy, sx = torch.meshgrid(sy, sx, indexing="ij")
            anchor_points.append(torch.stack((sx, sy), -1).view(-1, 2))
            stride_tensor.append(torch.full((h * w, 1), float(s)))
        self.register_buffer("anchors", torch.cat(anchor_points).transpose(0, 1).contiguous(), persistent=False)
        self.register_buffer("strides", torch.cat(stride_tensor).transpose(0, 1).contiguous(), persistent=False)

    @staticmethod
    def dist2bbox(distance, anchor_points, dim=1):
        lt, rb = distance.chunk(2, dim)
        x1y1 = anchor_points - lt
        x2y2 = anchor_points + rb
        c_xy = (x1y1 + x2y2) / 2
        wh = x2y2 - x1y1
        return torch.cat((c_xy, wh), dim)

    def forward(self, x):
        for i in range(self.nl):
            x[i] = torch.cat((self.cv2[i](x[i]), self.cv3[i](x[i])), 1)
        shape = x[0].shape
        x_cat = torch.cat([xi.view(shape[0], self.no, -1) for xi in x], 2)
        box, cls = x_cat.split((self.reg_max * 4, self.nc), 1)
        dbox = self.dist2bbox(self.dfl(box), self.anchors.unsqueeze(0), dim=1) * self.strides
        return torch.cat((dbox, cls.sigmoid()), 1)


class YOLOv8(nn.Module):
    """yolov8n.yaml layout (depth 0.33) with widths 8/16/24/32/40."""

    def __init__(self, nc=3, img=64, w=(8, 16, 24, 32, 40)):
        super().__init__()
        w1, w2, w3, w4, w5 = w
        self.b0 = YConv(3, w1, 3, 2)              # P1/2
        self.b1 = YConv(w1, w2, 3, 2)             # P2/4
        self.b2 = C2f(w2, w2, 1, True)
        self.b3 = YConv(w2, w3, 3, 2)             # P3/8
        self.b4 = C2f(w3, w3, 2, True)
        self.b5 = YConv(w3, w4, 3, 2)             # P4/16
        self.b6 = C2f(w4, w4, 2, True)
        self.b7 = YConv(w4, w5, 3, 2)             # P5/32
        self.b8 = C2f(w5, w5, 1, True)
        self.b9 = SPPF(w5, w5, 5)
        self.up = nn.Upsample(None, 2, "nearest")
        self.h12 = C2f(w5 + w4, w4, 1)
        self.h15 = C2f(w4 + w3, w3, 1)            # P3 out
        self.h16 = YConv(w3, w3, 3, 2)
        self.h18 = C2f(w3 + w4, w4, 1)            # P4 out
        self.h19 = YConv(w4, w4, 3, 2)
        self.h21 = C2f(w4 + w5, w5, 1)            # P5 out
        self.detect = Y8Detect(nc, (w3, w4, w5), (8, 16, 32), img)

    def after_init(self):
        self.detect.dfl.set_weights()   # fixed integral weights 0..15, not learned

    def forward(self, x):
        x = self.b2(self.b1(self.b0(x)))
        p3 = self.b4(self.b3(x))
        p4 = self.b6(self.b5(p3))
        p5 = self.b9(self.b8(self.b7(p4)))
        h12 = self.h12(torch.cat((self.up(p5), p4), 1))
        o3 = self.h15(torch.cat((self.up(h12), p3), 1))
        o4 = self.h18(torch.cat((self.h16(o3), h12), 1))
        o5 = self.h21(torch.cat((self.h19(o4), p5), 1))
        return self.detect([o3, o4, o5])


# ---------------------------------------------------------------------------
# BERT-style encoder (after transformers' modeling_bert.py, eager attention)
# ---------------------------------------------------------------------------

class BertSelfAttention(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.num_heads, self.head_size = heads, hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)

    def split_heads(self, t):
        return t.view(t.size()[:-1] + (self.num_heads, self.head_size)).permute(0, 2, 1, 3)

    def forward(self, x, mask_bias):
        q = self.split_heads(self.query(x))
        k = self.split_heads(self.key(x))
        v = self.split_heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_size)
        scores = scores + mask_bias
        probs = nn.functional.softmax(scores, dim=-1)
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        ctx = ctx.view(ctx.size()[:-2] + (self.num_heads * self.head_size,))
        return self.norm(self.dense(ctx) + x)                 # post-norm (BertSelfOutput)


class BertLayer(nn.Module):
    def __init__(self, hidden, heads, intermediate):
        super().__init__()
        self.attention = BertSelfAttention(hidden, heads)
        self.intermediate = nn.Linear(hidden, intermediate)
        self.act = nn.GELU()                                  # erf form
        self.output = nn.Linear(intermediate, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x, mask_bias):
        x = self.attention(x, mask_bias)
        return self.norm(self.output(self.act(self.intermediate(x))) + x)


class BertModel(nn.Module):
    """Embeddings (word + token type + position, LayerNorm), 2 post-norm layers.

    pooling="cls":  tanh(Linear(h[:, 0])) -> Linear -> logits (BertForSequenceClassification)
    pooling="mean": masked mean over tokens -> [N, hidden] (sentence-transformers style)
    """

    def __init__(self, pooling="cls", classes=3, vocab=BERT_VOCAB, hidden=BERT_HIDDEN, layers=2, heads=2,
                 intermediate=64, max_pos=BERT_SEQ, type_vocab=2):
        super().__init__()
        self.pooling = pooling
        self.word_embeddings = nn.Embedding(vocab, hidden, padding_idx=0)
        self.position_embeddings = nn.Embedding(max_pos, hidden)
        self.token_type_embeddings = nn.Embedding(type_vocab, hidden)
        self.emb_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.register_buffer("position_ids", torch.arange(max_pos).expand((1, -1)), persistent=False)
        self.register_buffer("token_type_ids", torch.zeros((1, max_pos), dtype=torch.long), persistent=False)
        self.layers = nn.ModuleList(BertLayer(hidden, heads, intermediate) for _ in range(layers))
        if pooling == "cls":
            self.pooler = nn.Linear(hidden, hidden)
            self.classifier = nn.Linear(hidden, classes)

    def forward(self, input_ids, attention_mask):
        n, s = input_ids.shape
        position_ids = self.position_ids[:, :s]
        token_type_ids = self.token_type_ids[:, :s].expand(n, s)
        x = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings(position_ids))
        x = self.emb_norm(x)
        # extended attention mask: [N, 1, S, S], 0 where attended, dtype min where padded
        mask = attention_mask[:, None, None, :].expand(n, 1, s, s)
        mask_bias = torch.where(mask == 0, torch.finfo(torch.float32).min, 0.0)
        for layer in self.layers:
            x = layer(x, mask_bias)
        if self.pooling == "mean":
            m = attention_mask.unsqueeze(-1).to(x.dtype)
            return (x * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)
        pooled = torch.tanh(self.pooler(x[:, 0]))
        return self.classifier(pooled)


def build_bert_cls():
    return BertModel("cls", classes=3)


def build_bert_embed():
    return BertModel("mean")


# ---------------------------------------------------------------------------
# exporting
# ---------------------------------------------------------------------------

class Spec:
    def __init__(self, family, build, task, seed, kind="image", res=32):
        self.family, self.build, self.task, self.seed, self.kind, self.res = family, build, task, seed, kind, res

    def example(self, batch, seed):
        if self.kind == "bert":
            d = make_bert_inputs(seed, batch)
            return {k: torch.from_numpy(v) for k, v in d.items()}
        return {"input": torch.from_numpy(make_input(seed, (batch, 3, self.res, self.res)))}

    @property
    def output_name(self):
        # Not "embedding": the dynamo exporter names the aten.embedding result
        # "embedding" as well and then writes a graph that is not in SSA form.
        return {"classification": "logits", "segmentation": "out", "detection": "output",
                "embedding": "sentence_embedding"}[self.task]

    def dynamic_axes(self):
        axes = {}
        for name in self.input_names:
            axes[name] = {0: "batch", 1: "sequence"} if self.kind == "bert" else {0: "batch"}
        axes[self.output_name] = {0: "batch"}
        return axes

    @property
    def input_names(self):
        return ["input_ids", "attention_mask"] if self.kind == "bert" else ["input"]


def legacy_export(model, spec: Spec, path, opset) -> None:
    """TorchScript-based exporter (dynamo=False), default constant folding, dynamic batch."""
    example = spec.example(TRACE_BATCH, 999)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, tuple(example.values()), path, input_names=spec.input_names,
                          output_names=[spec.output_name], dynamic_axes=spec.dynamic_axes(),
                          opset_version=opset, dynamo=False)


class quiet_output:
    """Send file descriptors 1 and 2 to a temporary file.

    On failure the TorchScript exporter prints the whole half-converted graph
    from C++ code, which ignores sys.stdout/sys.stderr; the error itself is
    still raised and recorded.
    """

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self.tmp = tempfile.TemporaryFile()
        self.saved = [(fd, os.dup(fd)) for fd in (1, 2)]
        for fd, _ in self.saved:
            os.dup2(self.tmp.fileno(), fd)
        return self

    def __exit__(self, *exc):
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in self.saved:
            os.dup2(saved, fd)
            os.close(saved)
        self.tmp.close()
        return False


def dynamo_export(model, spec: Spec, path, opset=None) -> None:
    example = spec.example(TRACE_BATCH, 999)
    batch = torch.export.Dim("batch", min=1, max=1024)
    if spec.kind == "bert":
        seq = torch.export.Dim("sequence", min=2, max=BERT_SEQ)
        dynamic_shapes = ({0: batch, 1: seq}, {0: batch, 1: seq})
    else:
        dynamic_shapes = ({0: batch},)
    kwargs = dict(dynamo=True, input_names=spec.input_names, output_names=[spec.output_name],
                  dynamic_shapes=dynamic_shapes)
    if opset is not None:
        kwargs["opset_version"] = opset
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tmp_path = os.path.join(tmp, "model.onnx")
        program = torch.onnx.export(model, tuple(example.values()), **kwargs)
        program.save(tmp_path)
        m = onnx.load(tmp_path, load_external_data=True)   # one self-contained file
    onnx.save_model(m, path, save_as_external_data=False)


DTYPE_NAMES = {v: k for k, v in onnx.TensorProto.DataType.items()}


def dtype_name(elem_type) -> str:
    return DTYPE_NAMES.get(elem_type, "?") if elem_type else "?"


def value_info_entry(vi) -> dict:
    dims = []
    for d in vi.type.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?"))
    return {"name": vi.name, "shape": dims, "dtype": dtype_name(vi.type.tensor_type.elem_type)}


def all_op_types(model: onnx.ModelProto) -> list[str]:
    ops = set()

    def visit(graph):
        for node in graph.node:
            ops.add(op_key(node))
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                for g in attr.graphs:
                    visit(g)

    visit(model.graph)
    for fn in model.functions:  # local functions would hide ops
        for node in fn.node:
            ops.add(op_key(node))
    return sorted(ops)


def op_key(node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def summarize_array(a: np.ndarray, with_values: bool):
    out = {"dtype": str(a.dtype), "shape": list(a.shape)}
    if with_values and a.size <= 8:
        v = a.tolist()
        if a.dtype.kind == "f":
            v = [float(f"{x:.6g}") for x in np.ravel(a)] if a.ndim else float(f"{float(a):.6g}")
        out["value"] = v
    return out


def summarize_attr(attr, with_values=True):
    h = onnx.helper.get_attribute_value(attr)
    if attr.type == onnx.AttributeProto.TENSOR:
        return summarize_array(numpy_helper.to_array(h), with_values)
    if attr.type == onnx.AttributeProto.GRAPH or attr.type == onnx.AttributeProto.GRAPHS:
        return "<graph>"
    if isinstance(h, bytes):
        return h.decode()
    if isinstance(h, float):
        return float(f"{h:.6g}")
    if isinstance(h, list):
        return [x.decode() if isinstance(x, bytes) else (float(f"{x:.6g}") if isinstance(x, float) else x) for x in h]
    return h


def node_inventory(model: onnx.ModelProto) -> list[dict]:
    """Per-node description: attributes, input/output dtypes, which inputs are constants."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # pragma: no cover - shape inference is best effort here
        inferred = model
    g = inferred.graph
    dtypes, ranks = {}, {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        dtypes[vi.name] = vi.type.tensor_type.elem_type
        if vi.type.tensor_type.HasField("shape"):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    consts = {}
    for t in g.initializer:
        consts[t.name] = numpy_helper.to_array(t)
        dtypes[t.name] = t.data_type
        ranks[t.name] = len(t.dims)
    foldable = set(consts)
    # values computed only from constants and tensor shapes (Shape of a runtime
    # tensor): known once the input shapes are fixed, e.g. by shape inference
    shape_derived = set()
    nodes = []
    for node in g.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attr = node.attribute[0]
            if attr.name == "value":
                consts[node.output[0]] = numpy_helper.to_array(attr.t)
                dtypes[node.output[0]] = attr.t.data_type
                ranks[node.output[0]] = len(attr.t.dims)
            foldable.add(node.output[0])
        inputs = []
        for name in node.input:
            if name == "":
                inputs.append(None)
            elif name in consts:
                inputs.append({"const": summarize_array(consts[name], True)})
            elif name in foldable:
                inputs.append("const-subgraph")
            elif name in shape_derived:
                inputs.append("shape-derived")
            else:
                inputs.append("runtime")
        is_foldable = node.op_type != "Constant" and all(n == "" or n in foldable for n in node.input)
        is_shape_derived = not is_foldable and len(node.input) > 0 and (
            node.op_type == "Shape"
            or all(n == "" or n in foldable or n in shape_derived for n in node.input))
        if is_foldable:
            foldable.update(node.output)
        elif is_shape_derived:
            shape_derived.update(node.output)
        nodes.append({
            "op": op_key(node),
            "attrs": {a.name: summarize_attr(a) for a in node.attribute},
            "input_dtypes": [dtype_name(dtypes.get(n)) if n else "" for n in node.input],
            "output_dtypes": [dtype_name(dtypes.get(n)) for n in node.output],
            "input_ranks": [ranks.get(n, "?") if n else "" for n in node.input],
            "inputs": inputs,
            "foldable": is_foldable,
            "shape_derived": is_shape_derived,
        })
    return nodes


def check_and_record(name: str, spec: Spec, exporter: str, model: nn.Module, manifest: list) -> None:
    """Validate NAME.onnx, write its input/output files, compare with torch, add a manifest entry."""
    path = os.path.join(OUT_DIR, name + ".onnx")
    onnx.checker.check_model(path, full_check=True)
    m = onnx.load(path)
    size = os.path.getsize(path)
    assert size < MAX_FILE_BYTES, f"{path} is {size} bytes"

    feeds = {k: v.numpy() for k, v in spec.example(BATCH, spec.seed).items()}
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == spec.input_names, [i.name for i in sess.get_inputs()]
    y = sess.run(None, feeds)[0]
    assert np.all(np.isfinite(y)), name
    if spec.kind == "bert":
        np.savez(os.path.join(OUT_DIR, name + ".inputs.npz"), **feeds)
        input_file = name + ".inputs.npz"
    else:
        np.save(os.path.join(OUT_DIR, name + ".input.npy"), np.ascontiguousarray(feeds["input"], dtype="<f4"))
        input_file = name + ".input.npy"
    np.save(os.path.join(OUT_DIR, name + ".ort_output.npy"), np.ascontiguousarray(y, dtype="<f4"))

    with torch.no_grad():
        expected = model(*[torch.from_numpy(v) for v in feeds.values()]).numpy()
    assert expected.shape == y.shape, (expected.shape, y.shape)
    scale = float(np.abs(expected).max())
    diff = float(np.abs(expected - y).max())
    rel = diff / max(scale, 1e-12)
    print(f"  max |torch - ort| = {diff:.3g}, relative to max |torch| ({scale:.3g}) = {rel:.3g}")
    assert rel <= REL_TOL, (name, rel)

    # The dynamic axes really are dynamic: batch 1 (and a shorter sequence for BERT) also runs.
    other = spec.example(1, spec.seed + 1)
    if spec.kind == "bert":
        other = {k: v[:, :9] for k, v in other.items()}
    other = {k: v.numpy() for k, v in other.items()}
    y1 = sess.run(None, other)[0]
    with torch.no_grad():
        e1 = model(*[torch.from_numpy(v) for v in other.values()]).numpy()
    assert float(np.abs(e1 - y1).max()) <= REL_TOL * max(1.0, float(np.abs(e1).max())), name

    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    ops = all_op_types(m)
    counts: dict = {}
    for node in m.graph.node:
        counts[op_key(node)] = counts.get(op_key(node), 0) + 1
    entry = {
        "file": name + ".onnx",
        "family": spec.family,
        "task": spec.task,
        "exporter": exporter,
        "opset": opset,
        "other_opsets": {o.domain: o.version for o in m.opset_import if o.domain not in ("", "ai.onnx")},
        "ir_version": m.ir_version,
        "producer": f"{m.producer_name} {m.producer_version}".strip(),
        "inputs": [value_info_entry(vi) for vi in m.graph.input],
        "outputs": [value_info_entry(vi) for vi in m.graph.output],
        "op_types": ops,
        "unsupported_op_types": [o for o in ops if o not in SUPPORTED_OPS],
        "op_counts": dict(sorted(counts.items())),
        "node_count": len(m.graph.node),
        "parameter_count_torch": int(sum(p.numel() for p in model.parameters())),
        "initializer_elements": int(sum(int(np.prod(t.dims)) for t in m.graph.initializer)),
        "bytes": size,
        "input_file": input_file,
        "input_arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in feeds.items()},
        "ort_output_file": name + ".ort_output.npy",
        "ort_output_shape": list(y.shape),
        "max_abs_diff_vs_torch": diff,
        "max_rel_diff_vs_torch": rel,
        "checked_batch_1" + ("_seq_9" if spec.kind == "bert" else ""): True,
    }
    manifest.append(entry)
    print(f"{name}: opset {opset}, {size} bytes, ops {ops}")
    if entry["unsupported_op_types"]:
        print(f"  ops outside Whittle's list: {entry['unsupported_op_types']}")
    entry["_nodes"] = node_inventory(m)


# ---------------------------------------------------------------------------
# conditioning: data-dependent, LSUV-style rescaling of the random weights
# ---------------------------------------------------------------------------

CONDITIONING: dict = {}  # family -> lsuv_normalize summary
CALIB_BATCH = 128       # images (or token sequences) used to condition every model
CALIB_SEED_OFFSET = 5000
LN_GAMMA_SPREAD = 0.2   # LayerNorm gamma is squeezed from 1 +- 0.5 to 1 +- 0.2


def random_bert_batch(seed: int, batch: int, seq: int = BERT_SEQ) -> dict:
    """Random token ids with random lengths (row 0 full, the others 4..seq valid tokens)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, BERT_VOCAB, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    lengths = rng.integers(4, seq + 1, size=batch)
    lengths[0] = seq
    for row, valid in enumerate(lengths):
        mask[row, valid:] = 0
        ids[row, valid:] = 0
    ids[:, 0] = 1
    return {"input_ids": ids, "attention_mask": mask}


def calibration_batch(spec: "Spec", seed: int, batch: int = CALIB_BATCH) -> dict:
    """numpy feeds: standard-normal images at the model's resolution, or random token ids for bert_*."""
    if spec.kind == "bert":
        return random_bert_batch(seed, batch)
    return {"input": make_input(seed, (batch, 3, spec.res, spec.res))}


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().double().pow(2).mean().sqrt())


def lsuv_normalize(model: nn.Module, spec: "Spec") -> dict:
    """Rescale a randomly initialised eval-mode model so every layer's output is of order one.

    Trained networks keep their activations within a small multiple of their
    typical magnitude at every depth; He init plus random BatchNorm statistics
    does not (activations grow or shrink geometrically with depth, e.g.
    |x| ~ 1e3 in the LR-ASPP backbone). One forward pass over a fixed
    calibration batch (CALIB_BATCH standard-normal images, or random token
    ids) with hooks that, in forward order, measure each layer's output and
    rescale that layer before its output reaches the next one (LSUV, Mishkin &
    Matas 2016, applied layer by layer):

      * BatchNorm2d: gamma /= std, beta = (beta - mean) / std, with the std and
        mean of the layer's whole output over the batch, so the output has
        std 1 and mean 0 while the random per-channel structure (gamma, beta,
        running statistics) is kept. Per-channel normalisation (i.e. running
        statistics taken from the batch) is deliberately not used: subtracting
        every channel's own mean throws away the part of the signal that
        ReLU-like activations put into the channel means, which makes deep
        random networks chaotic (each layer amplifies a perturbation by
        ~sqrt(E[a^2]/Var[a]), 1.2 for ReLU), and int8 noise then grows
        exponentially with depth.
      * Conv2d / Linear (those not followed by a BatchNorm matter; the others
        are renormalised by their BatchNorm anyway): weight and bias /= RMS of
        the output, so the output has RMS 1. Layers whose weights are frozen
        (requires_grad False, e.g. YOLOv8's DFL integral) are left alone.
      * nn.MultiheadAttention (ViT): the q, k and v thirds of in_proj are
        scaled to RMS 1 each, out_proj like a Linear.
      * LayerNorm: gamma is squeezed towards 1 (1 +- LN_GAMMA_SPREAD), beta kept.

    CALIB_BATCH is 128 rather than 16: deep features of noise images at 1x1
    or 2x2 resolution vary mostly between images, and scales fitted to 16 of
    them do not carry over (with 16, EfficientNet's last layers had std 1.4 to
    3 instead of 1 on other batches of 16).

    Returns a summary (counts and the spread of the normalised outputs,
    re-measured after the pass).
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                m.weight.copy_(1.0 + (m.weight - 1.0) * (LN_GAMMA_SPREAD / 0.5))
    feeds = {k: torch.from_numpy(v) for k, v in calibration_batch(spec, spec.seed + CALIB_SEED_OFFSET).items()}
    done: set = set()

    def bn_hook(m, args, out):
        if m in done:
            return None
        done.add(m)
        std, mean = float(out.std()), float(out.mean())
        if std < 1e-12:
            return None
        m.weight.div_(std)
        m.bias.sub_(mean).div_(std)
        return (out - mean) / std

    def linear_hook(m, args, out):
        if m in done or not m.weight.requires_grad:
            return None
        done.add(m)
        r = _rms(out)
        if r < 1e-12:
            return None
        m.weight.div_(r)
        if m.bias is not None:
            m.bias.div_(r)
        return out / r

    def mha_pre_hook(m, args):
        if m in done:
            return None
        e = m.embed_dim
        for i in range(3):
            rows = slice(i * e, (i + 1) * e)
            r = _rms(nn.functional.linear(args[i], m.in_proj_weight[rows], m.in_proj_bias[rows]))
            m.in_proj_weight[rows] /= r
            m.in_proj_bias[rows] /= r
        return None

    def mha_hook(m, args, out):
        if m in done:
            return None
        done.add(m)
        r = _rms(out[0])
        m.out_proj.weight.div_(r)
        m.out_proj.bias.div_(r)
        return (out[0] / r,) + tuple(out[1:])

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            hooks.append(m.register_forward_hook(bn_hook))
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, nn.MultiheadAttention):
            hooks.append(m.register_forward_pre_hook(mha_pre_hook))
            hooks.append(m.register_forward_hook(mha_hook))
    with torch.no_grad():
        model(*feeds.values())
    for h in hooks:
        h.remove()

    # re-measure: every normalised output should now be std 1 (BatchNorm) or RMS 1
    seen: dict = {}

    def record(m, args, out):
        t = out[0] if isinstance(out, tuple) else out
        seen.setdefault(m, float(t.std()) if isinstance(m, nn.BatchNorm2d) else _rms(t))

    hooks = [m.register_forward_hook(record) for m in done]
    with torch.no_grad():
        y = model(*feeds.values())
    for h in hooks:
        h.remove()
    values = list(seen.values())
    kinds = {}
    for m in done:
        k = "BatchNorm2d" if isinstance(m, nn.BatchNorm2d) else type(m).__name__
        kinds[k] = kinds.get(k, 0) + 1
    return {"calibration": f"{CALIB_BATCH} {'random token sequences' if spec.kind == 'bert' else 'standard-normal images'}"
                           f", seed {spec.seed + CALIB_SEED_OFFSET}",
            "normalized_layers": dict(sorted(kinds.items())),
            "output_scale_range": [round(min(values), 4), round(max(values), 4)] if values else None,
            "torch_output_max_abs": float(y.abs().max())}


# ---------------------------------------------------------------------------
# int8 verification with onnxruntime's own static quantizer
# ---------------------------------------------------------------------------

INT8_CALIB_SEED, INT8_CALIB_COUNT = 1, 16
INT8_EVAL_SEED, INT8_EVAL_COUNT = 2, 8
INT8_GOAL = 0.05
MASK_SENTINEL = 1e30    # |x| above this is the additive attention mask (finfo(float32).min), not a signal


def _float_session(model: onnx.ModelProto, all_tensors: bool):
    """Session on the float model; with all_tensors, every tensor computed from input values is an output too."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = []
    if all_tensors:
        runtime = {i.name for i in m.graph.input}
        have = {o.name for o in m.graph.output}
        for node in m.graph.node:   # tensors that depend on the values of a graph input (not constants,
            if node.op_type in ("Shape", "Size"):   # not numbers derived from tensor shapes)
                continue
            if any(n in runtime for n in node.input):
                for o in node.output:
                    if o:
                        runtime.add(o)
                        if o not in have:
                            names.append(o)
        m.graph.output.extend([onnx.ValueInfoProto(name=n) for n in names])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run_named(sess, feeds) -> dict:
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def activation_ranges(path: str, feeds: dict) -> dict:
    """name -> max |x| over every runtime float tensor of the graph (intermediates and outputs)."""
    sess = _float_session(onnx.load(path), all_tensors=True)
    return {n: float(np.abs(a).max()) for n, a in _run_named(sess, feeds).items()
            if isinstance(a, np.ndarray) and a.dtype.kind == "f" and a.size}


def _static_batch_copy(path: str, out: str) -> None:
    """The model with its dynamic input axes fixed (batch 1, sequence BERT_SEQ).

    onnxruntime's symbolic shape inference (quant_pre_process) gives up on
    several of the dynamic-axis graphs (Reshape targets built from Shape ops,
    Min(16, sequence) broadcasts); with static inputs it can finish them.
    """
    m = onnx.load(path)
    for vi in m.graph.input:
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = 1 if axis == 0 else BERT_SEQ
    for vi in m.graph.output:
        for d in vi.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.Clear()
    del m.graph.value_info[:]
    onnx.save(m, out)


class _in_directory:
    """chdir for the duration (onnxruntime's quantization tools can leave temporary files in the cwd)."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        self.saved = os.getcwd()
        os.chdir(self.path)

    def __exit__(self, *exc):
        os.chdir(self.saved)
        return False


class _ListReader(CalibrationDataReader):
    def __init__(self, samples):
        self.samples = iter(samples)

    def get_next(self):
        return next(self.samples, None)


def _split(feeds: dict) -> list:
    n = next(iter(feeds.values())).shape[0]
    return [{k: v[i:i + 1] for k, v in feeds.items()} for i in range(n)]


def _rel_rmse(y, ref) -> float:
    return float(np.sqrt(np.mean((np.asarray(y, np.float64) - ref) ** 2)) / max(np.sqrt(np.mean(ref ** 2)), 1e-30))


def int8_verify(path: str, spec: "Spec", tmp: str, diagnose: bool = True, nodes_to_exclude=None) -> dict:
    """quantize_static (QDQ, QInt8 activations and weights, MinMax, per-channel) and compare with float.

    Calibration: INT8_CALIB_COUNT inputs (seed INT8_CALIB_SEED), fed one at a
    time; evaluation: INT8_EVAL_COUNT others (seed INT8_EVAL_SEED). bert_*
    get a two-input reader (random token ids and masks). Relative RMSE of the
    first output, sqrt(mean((y_q - y_f)^2)) / sqrt(mean(y_f^2)).
    """
    tmp = os.path.abspath(tmp)
    static, pre, qpath = (os.path.join(tmp, f) for f in ("static.onnx", "pre.onnx", "int8.onnx"))
    _static_batch_copy(path, static)
    pre_process = "quant_pre_process (static batch 1)"
    path = os.path.abspath(path)
    calib = _split(calibration_batch(spec, INT8_CALIB_SEED, INT8_CALIB_COUNT))
    evals = _split(calibration_batch(spec, INT8_EVAL_SEED, INT8_EVAL_COUNT))
    with _in_directory(tmp):
        try:
            with quiet_output():
                quant_pre_process(static, pre)
        except Exception:   # symbolic shape inference cannot do some graphs (ViT's Reshapes): ONNX's only
            with quiet_output():
                quant_pre_process(static, pre, skip_symbolic_shape=True)
            pre_process += ", skip_symbolic_shape=True (symbolic shape inference failed)"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(pre, qpath, _ListReader(calib), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, per_channel=True,
                            nodes_to_exclude=nodes_to_exclude)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    fsess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    qsess = ort.InferenceSession(qpath, so, providers=["CPUExecutionProvider"])
    yf = np.concatenate([fsess.run(None, e)[0] for e in evals]).astype(np.float64)
    yq = np.concatenate([qsess.run(None, e)[0] for e in evals]).astype(np.float64)
    qmodel = onnx.load(qpath)
    inits = {t.name: t for t in qmodel.graph.initializer}
    act_q = [n for n in qmodel.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    result = {
        "ort_int8_rel_rmse": _rel_rmse(yq, yf),
        # how much of the float output actually depends on the input (std over the evaluation
        # inputs / RMS): a near-constant output makes any relative error look small
        "output_input_dependence": float(np.sqrt(np.mean(yf.std(axis=0) ** 2)) / max(np.sqrt(np.mean(yf ** 2)), 1e-30)),
        "activation_quantization_points": len(act_q),
        "pre_process": pre_process,
    }
    if diagnose:
        d = int8_diagnosis(pre, qpath, qmodel, act_q, evals)
        result["step_noise_median"] = d.pop("step_noise_median")
        result["step_noise_quadrature_sum"] = d.pop("step_noise_quadrature_sum")
        if result["ort_int8_rel_rmse"] > INT8_GOAL:
            result["diagnosis"] = d
    return result


def int8_diagnosis(pre: str, qpath: str, qmodel, act_q, evals, top: int = 5) -> dict:
    """Where the int8 error comes from: every float tensor of the quantized graph vs the float graph.

    widest_ranges: tensors with the largest max|x| / RMS (what sets a tensor's
    int8 step relative to its typical value); error_jumps: nodes whose output
    error most exceeds the error of their inputs (where error is injected);
    step_noise: per activation quantization point, (scale / sqrt(12)) / RMS,
    the relative noise that point adds, and the quadrature sum over all points.
    """
    fsess = _float_session(onnx.load(pre), all_tensors=True)
    qsess = _float_session(qmodel, all_tensors=True)
    fv: dict = {}
    qv: dict = {}
    for e in evals:
        for store, sess in ((fv, fsess), (qv, qsess)):
            for n, a in _run_named(sess, e).items():
                if isinstance(a, np.ndarray) and a.dtype.kind == "f" and a.size:
                    store.setdefault(n, []).append(a.astype(np.float64))
    fv = {n: np.stack(v) for n, v in fv.items()}
    qv = {n: np.stack(v) for n, v in qv.items() if len(v) == len(evals)}
    # what the consumers of tensor T see in the int8 graph: T's DequantizeLinear output if T is
    # quantized, else T itself if the same kind of node still produces it (the quantizer drops
    # e.g. a Relu after a Conv and lets the Conv write the Relu's tensor, clamped by the QDQ pair)
    fproducer = {o: n.op_type for n in onnx.load(pre).graph.node for o in n.output}
    qproducer = {o: n.op_type for n in qmodel.graph.node for o in n.output}
    err = {}
    for n, a in fv.items():
        q = qv.get(n + "_DequantizeLinear_Output")
        if q is None and qproducer.get(n) == fproducer.get(n):
            q = qv.get(n)
        if q is not None and q.shape == a.shape and np.all(np.isfinite(a)) and np.abs(a).max() < MASK_SENTINEL:
            err[n] = _rel_rmse(q, a)
    widest = []
    for n, a in fv.items():
        if not np.all(np.isfinite(a)):
            continue
        rms = float(np.sqrt(np.mean(a ** 2)))
        widest.append({"tensor": n, "max_abs": float(np.abs(a).max()), "rms": rms,
                       "max_over_rms": float(np.abs(a).max()) / max(rms, 1e-30)})
    sentinel = [{"tensor": n, "max_abs": float(np.abs(a[np.isfinite(a)]).max())} for n, a in fv.items()
                if np.isfinite(a).all() and np.abs(a).max() >= MASK_SENTINEL]
    sentinel_names = {w["tensor"] for w in sentinel}
    jumps = []
    for node in onnx.load(pre).graph.node:
        outs = [o for o in node.output if o in err]
        if not outs:
            continue
        e_in = []
        for i in node.input:
            if i in err:
                e_in.append(err[i])
            elif not i or i not in fv or i in sentinel_names:   # graph input, constant, or the mask
                e_in.append(0.0)
            else:                                              # not observable in the int8 graph
                e_in = None
                break
        if e_in is None:
            continue
        jumps.append({"node": node.name or outs[0], "op": node.op_type, "input_error": round(max(e_in + [0.0]), 4),
                      "output_error": round(max(err[o] for o in outs), 4)})
    inits = {t.name: numpy_helper.to_array(t) for t in qmodel.graph.initializer}
    noise = []
    for n in act_q:
        x = n.input[0]
        if x in fv and n.input[1] in inits and np.all(np.isfinite(fv[x])):
            rms = float(np.sqrt(np.mean(fv[x] ** 2)))
            if rms > 0:   # an all-zero tensor (a dead ReLU) carries no signal to add noise to
                noise.append(float(inits[n.input[1]]) / math.sqrt(12) / rms)
    noise_arr = np.array(noise) if noise else np.zeros(1)
    return {
        "widest_ranges": sorted(widest, key=lambda w: -w["max_over_rms"])[:top],
        "largest_tensors": sorted(widest, key=lambda w: -w["max_abs"])[:top],
        "mask_sentinel_tensors": sentinel[:top],
        "error_jumps": sorted(jumps, key=lambda j: -(j["output_error"] - j["input_error"]))[:top],
        "error_by_depth": [{"node": j["node"], "output_error": j["output_error"]}
                           for j in jumps[:: max(1, len(jumps) // 8)]] + ([jumps[-1]] if jumps else []),
        "step_noise_median": float(np.median(noise_arr)),
        "step_noise_quadrature_sum": float(np.sqrt(np.sum(noise_arr ** 2))),
    }


def conditioning_report(path: str, spec: "Spec", tmp: str, diagnose: bool = True) -> dict:
    """max |activation| on the int8 calibration batch and the int8 verification, for one exported file."""
    ranges = activation_ranges(path, calibration_batch(spec, INT8_CALIB_SEED, INT8_CALIB_COUNT))
    name, top = max(ranges.items(), key=lambda kv: kv[1])
    report = {"max_abs_activation": top, "max_abs_activation_tensor": name}
    finite = {n: v for n, v in ranges.items() if v < MASK_SENTINEL}
    if len(finite) < len(ranges):
        n2, v2 = max(finite.items(), key=lambda kv: kv[1])
        report["max_abs_activation_without_mask_sentinel"] = v2
        report["max_abs_activation_without_mask_sentinel_tensor"] = n2
    try:
        report.update(int8_verify(path, spec, tmp, diagnose=diagnose))
    except Exception as exc:  # record, do not crash: the fixtures themselves are fine
        report["ort_int8_error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
    if diagnose and spec.kind == "bert" and report.get("ort_int8_rel_rmse", 0.0) > INT8_GOAL:
        # diagnostic only: the same quantization with the additive-mask Adds (whose range is the
        # float32 minimum) left in float
        # (an excluded node's input is still quantized when its consumer is, so the Softmax
        # reading the masked scores is excluded too)
        m = onnx.load(path)
        masked = {o for n in m.graph.node if n.op_type == "Add" for o in n.output
                  if o in ranges and ranges[o] >= MASK_SENTINEL}
        nodes = [n.name for n in m.graph.node if set(n.output) & masked or (
            n.op_type == "Softmax" and set(n.input) & masked)]
        try:
            sub = tempfile.mkdtemp(dir=tmp)
            report["ort_int8_rel_rmse_mask_in_float"] = int8_verify(
                path, spec, sub, diagnose=False, nodes_to_exclude=nodes)["ort_int8_rel_rmse"]
            report["mask_nodes_in_float"] = nodes
        except Exception as exc:
            report["ort_int8_rel_rmse_mask_in_float"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return report


def build_model(spec: Spec, normalize: bool = True) -> nn.Module:
    """Random weights with fixed seeds; normalize=False is the unconditioned model (for comparison)."""
    torch.manual_seed(spec.seed)
    model = spec.build()
    he_init(model)
    randomize_bn(model, spec.seed + 1000)
    if hasattr(model, "after_init"):
        model.after_init()
    model.eval()
    if normalize:
        CONDITIONING[spec.family] = lsuv_normalize(model, spec)
    return model


def inventory(manifest: list, ops: set, with_values: bool) -> dict:
    """op -> files using it, node counts, and every distinct usage signature."""
    result = {}
    for op in sorted(ops):
        usages: dict = {}
        files, n_nodes, n_fold, n_shape = [], 0, 0, 0
        for e in manifest:
            hits = [n for n in e["_nodes"] if n["op"] == op]
            if not hits:
                continue
            files.append(e["file"][:-5])
            for n in hits:
                n_nodes += 1
                n_fold += n["foldable"]
                n_shape += n["shape_derived"]
                if with_values:
                    inputs = n["inputs"]
                    attrs = n["attrs"]
                else:
                    inputs = ["const" if isinstance(i, dict) else i for i in n["inputs"]]
                    attrs = {k: (v if not isinstance(v, dict) else {"dtype": v["dtype"], "shape": v["shape"]})
                             for k, v in n["attrs"].items()}
                sig = {"attrs": attrs, "input_dtypes": n["input_dtypes"], "output_dtypes": n["output_dtypes"],
                       "input_ranks": n["input_ranks"], "inputs": inputs}
                key = json.dumps(sig, sort_keys=True)
                u = usages.setdefault(key, dict(sig, count=0, foldable_count=0, shape_derived_count=0, files=[]))
                u["count"] += 1
                u["foldable_count"] += n["foldable"]
                u["shape_derived_count"] += n["shape_derived"]
                if e["file"][:-5] not in u["files"]:
                    u["files"].append(e["file"][:-5])
        result[op] = {"files": files, "node_count": n_nodes, "foldable_node_count": n_fold,
                      "shape_derived_node_count": n_shape,
                      "usages": sorted(usages.values(), key=lambda u: -u["count"])}
    return result


def verify_conditioning(manifest: list, jobs: dict) -> list:
    """Verification pass: activation ranges and onnxruntime int8 error, before and after lsuv_normalize.

    "before" re-exports the same family without the conditioning step (the
    weights the zoo had before it) with the same exporter into a temporary
    directory. Adds to every manifest entry max_abs_activation (largest |x|
    over all runtime tensors on the int8 calibration batch), ort_int8_rel_rmse
    (plus output_input_dependence, activation_quantization_points and, above
    INT8_GOAL, a diagnosis), conditioning (what lsuv_normalize did) and
    before_normalization; prints a table. Returns the files above INT8_GOAL with the likely cause.
    """
    rows = []
    above = []
    for e in manifest:
        name = e["file"][:-5]
        spec, kind, opset = jobs[name]
        print(f"== int8 verification: {name}")
        with tempfile.TemporaryDirectory() as tmp:
            after = conditioning_report(os.path.join(OUT_DIR, e["file"]), spec, tmp)
            before: dict = {}
            try:
                model0 = build_model(spec, normalize=False)
                path0 = os.path.join(tmp, "before.onnx")
                with quiet_output(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if kind == "legacy":
                        legacy_export(model0, spec, path0, opset)
                    else:
                        dynamo_export(model0, spec, path0, opset)
                os.makedirs(os.path.join(tmp, "b"))
                before = conditioning_report(path0, spec, os.path.join(tmp, "b"), diagnose=False)
            except Exception as exc:
                before = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        e["conditioning"] = CONDITIONING.get(spec.family)
        e.update(after)
        e["before_normalization"] = {k: before[k] for k in (
            "max_abs_activation", "max_abs_activation_tensor", "max_abs_activation_without_mask_sentinel",
            "ort_int8_rel_rmse", "output_input_dependence", "error", "ort_int8_error") if k in before}
        rmse = after.get("ort_int8_rel_rmse")
        status = "ok" if rmse is not None and rmse <= INT8_GOAL else ("ERROR" if rmse is None else "ABOVE GOAL")
        print(f"  max|x| {before.get('max_abs_activation', float('nan')):.4g} -> {after['max_abs_activation']:.4g}"
              f" ({after['max_abs_activation_tensor']}), int8 rel RMSE "
              f"{before.get('ort_int8_rel_rmse', float('nan')):.4f} -> {rmse if rmse is None else round(rmse, 4)}"
              f", output input-dependence {after.get('output_input_dependence', float('nan')):.3f}: {status}")
        if "step_noise_median" in after:
            print(f"  {after['activation_quantization_points']} activation quantization points, step noise median "
                  f"{after['step_noise_median']:.4f}, quadrature sum {after['step_noise_quadrature_sum']:.3f}")
        d = after.get("diagnosis")
        if d:
            for w in d["widest_ranges"][:3]:
                print(f"    widest: {w['tensor']}: max {w['max_abs']:.3g}, rms {w['rms']:.3g}")
            for w in d["mask_sentinel_tensors"][:2]:
                print(f"    mask sentinel: {w['tensor']}: max {w['max_abs']:.3g}")
            for j in d["error_jumps"][:3]:
                print(f"    error jump: {j['op']} {j['node']}: {j['input_error']} -> {j['output_error']}")
        if "ort_int8_rel_rmse_mask_in_float" in after:
            print(f"  with the additive-mask Add and its Softmax left in float: "
                  f"{after['ort_int8_rel_rmse_mask_in_float']}")
        if "ort_int8_error" in after:
            print(f"  int8 verification failed: {after['ort_int8_error']}")
        if status != "ok":
            item = {"name": name, "ort_int8_rel_rmse": rmse}
            d = after.get("diagnosis", {})
            if d.get("mask_sentinel_tensors"):
                item["cause"] = ("additive attention mask: the Add of scores and mask (float32 minimum where padded) "
                                 "is quantized with a scale of ~1e36, so every unmasked score rounds to 0; with that "
                                 "Add and its Softmax left in float the error is "
                                 f"{after.get('ort_int8_rel_rmse_mask_in_float')}")
            elif d:
                worst = d["widest_ranges"][0] if d["widest_ranges"] else {}
                item["cause"] = (f"accumulated rounding noise: {after['activation_quantization_points']} activation "
                                 f"quantization points, median step noise {after['step_noise_median']:.4f} of the "
                                 f"tensor RMS (quadrature sum {after['step_noise_quadrature_sum']:.3f}); widest "
                                 f"tensor max/RMS {worst.get('max_over_rms', float('nan')):.1f}; error grows "
                                 "steadily with depth (diagnosis.error_by_depth)")
            else:
                item["cause"] = after.get("ort_int8_error", "?")
            above.append(item)
        rows.append((name, before.get("max_abs_activation"), after["max_abs_activation"],
                     after.get("max_abs_activation_without_mask_sentinel"), before.get("ort_int8_rel_rmse"), rmse,
                     before.get("output_input_dependence"), after.get("output_input_dependence"),
                     after.get("activation_quantization_points"), after.get("step_noise_quadrature_sum"), status))

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    print()
    print("max|activation|: largest |x| over all runtime tensors on the 16 calibration inputs ('w/o mask': without "
          "the additive attention mask, whose value is the float32 minimum); input dep.: std of the float output "
          "over the 8 evaluation inputs / its RMS; q-pts: activation quantization points; noise: quadrature sum "
          "over them of (scale / sqrt(12)) / RMS")
    print(f"{'model':20s} {'max|activation| before -> after':>38s} {'int8 rel RMSE':>21s} {'input dep.':>14s}"
          f" {'q-pts':>6s} {'noise':>6s}  status")
    for name, b, a, a2, rb, ra, db, da, npts, noise, status in rows:
        after_txt = f(a, ".4g") + (f" ({f(a2, '.3g')} w/o mask)" if a2 is not None else "")
        print(f"{name:20s} {f(b, '.4g'):>10s} -> {after_txt:<24s} {f(rb, '.4f'):>7s} -> {f(ra, '.4f'):<7s}"
              f" {f(db, '.3f'):>5s} -> {f(da, '.3f'):<5s} {f(npts, 'd'):>6s} {f(noise, '.3f'):>6s}  {status}")
    return above


def main() -> None:
    if not os.path.isdir(".git") or not os.path.isdir("scripts"):
        sys.exit("run from the repository root")
    torch.set_num_threads(2)
    if os.path.isdir(OUT_DIR):
        shutil.rmtree(OUT_DIR)
    os.makedirs(OUT_DIR)
    manifest: list = []
    failures: list = []

    specs = [
        Spec("mobilenetv3", build_mobilenetv3, "classification", 10),
        Spec("efficientnet", build_efficientnet, "classification", 11),
        Spec("shufflenetv2", build_shufflenetv2, "classification", 12),
        Spec("squeezenet", build_squeezenet, "classification", 13),
        Spec("regnety", build_regnety, "classification", 14),
        Spec("densenet", build_densenet, "classification", 15),
        Spec("resnet50", build_resnet50, "classification", 16),
        Spec("convnext", build_convnext, "classification", 17),
        Spec("vit", build_vit, "classification", 18),
        Spec("bert_cls", build_bert_cls, "classification", 19, kind="bert"),
        Spec("bert_embed", build_bert_embed, "embedding", 20, kind="bert"),
        Spec("lraspp", build_lraspp, "segmentation", 21, res=64),
        Spec("deeplabv3", build_deeplabv3, "segmentation", 22, res=64),
        Spec("fcn", build_fcn, "segmentation", 23, res=64),
        Spec("yolov5", YOLOv5, "detection", 24, res=64),
        Spec("yolov8", YOLOv8, "detection", 25, res=64),
    ]
    by_family = {s.family: s for s in specs}
    legacy = "torch.onnx.export(dynamo=False) TorchScript exporter, default constant folding"
    dyn = "torch.onnx.export(dynamo=True)"

    jobs = [(s.family + "_op17", s, "legacy", 17) for s in specs]
    jobs += [(f + "_dynamo", by_family[f], "dynamo", None)
             for f in ("mobilenetv3", "vit", "bert_cls", "bert_embed", "yolov8", "convnext")]
    jobs += [(f + "_op13", by_family[f], "legacy", 13) for f in ("vit", "bert_cls")]
    # nn.MultiheadAttention (ViT) goes through aten::scaled_dot_product_attention, which the
    # TorchScript exporter only supports from opset 14: vit_op13 fails, vit_op14 is the lowest
    jobs += [("vit_op14", by_family["vit"], "legacy", 14)]
    jobs += [(f + "_op20", by_family[f], "legacy", 20) for f in ("vit", "bert_cls")]

    for name, spec, kind, opset in jobs:
        print(f"== {name}")
        model = build_model(spec)
        path = os.path.join(OUT_DIR, name + ".onnx")
        if kind == "legacy" and opset == 17:
            legacy_export(model, spec, path, opset)
            exporter = f"{legacy}, opset {opset}"
        elif kind == "legacy":   # the extra opsets may legitimately be unsupported: record, do not crash
            try:
                with quiet_output():
                    legacy_export(model, spec, path, opset)
            except Exception as exc:
                msg = f"{type(exc).__name__}: {str(exc).splitlines()[-1] if str(exc) else ''}"
                print(f"  TorchScript export at opset {opset} FAILED: {msg[:300]}")
                failures.append({"name": name, "family": spec.family, "exporter": f"{legacy}, opset {opset}",
                                 "error": msg[:2000]})
                if os.path.exists(path):
                    os.remove(path)
                continue
            exporter = f"{legacy}, opset {opset}"
        else:
            try:
                dynamo_export(model, spec, path, opset)
            except Exception as exc:  # record, do not crash
                msg = f"{type(exc).__name__}: {exc}"
                print(f"  dynamo export FAILED: {msg[:300]}")
                failures.append({"name": name, "family": spec.family, "exporter": dyn, "error": msg[:2000]})
                if os.path.exists(path):
                    os.remove(path)
                continue
            exporter = f"{dyn}, default opset" if opset is None else f"{dyn}, opset {opset}"
            try:
                check_and_record(name, spec, exporter, model, manifest)
            except Exception as exc:  # an invalid or wrong dynamo file is recorded, not kept
                msg = f"{type(exc).__name__}: {exc}"
                print(f"  dynamo export did not validate: {msg[:300]}")
                failures.append({"name": name, "family": spec.family, "exporter": dyn,
                                 "error": "exported, but failed validation: " + msg[:2000]})
                for suffix in (".onnx", ".input.npy", ".inputs.npz", ".ort_output.npy"):
                    if os.path.exists(os.path.join(OUT_DIR, name + suffix)):
                        os.remove(os.path.join(OUT_DIR, name + suffix))
                if manifest and manifest[-1]["file"] == name + ".onnx":
                    manifest.pop()
            continue
        check_and_record(name, spec, exporter, model, manifest)

    int8_above_goal = verify_conditioning(manifest, {name: (spec, kind, opset) for name, spec, kind, opset in jobs})

    op_types_all = set().union(*(e["op_types"] for e in manifest))
    unsupported = op_types_all - SUPPORTED_OPS
    not_yet = inventory(manifest, unsupported, with_values=True)
    supported_usage = inventory(manifest, op_types_all & SUPPORTED_OPS, with_values=False)
    for e in manifest:
        del e["_nodes"]

    total = sum(os.path.getsize(os.path.join(OUT_DIR, f)) for f in os.listdir(OUT_DIR))
    summary = {
        "generated_by": "scripts/make_zoo.py",
        "onnxruntime_version": ort.__version__,
        "onnx_version": onnx.__version__,
        "onnxscript_version": __import__("onnxscript").__version__,
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "numpy_version": np.__version__,
        "inputs": ("image models: NAME.input.npy, float32 standard normal, batch 2, numpy default_rng(seed), "
                   "NCHW, C order, little-endian, single input named 'input'. bert_*: NAME.inputs.npz with int64 "
                   "'input_ids' [2, 16] in [0, 100) and int64 'attention_mask' [2, 16] (row 1 has 5 trailing "
                   "zeros), fed as the graph's two inputs of the same names"),
        "ort_output": "first graph output from onnxruntime CPUExecutionProvider on the file as written",
        "tolerance": "max |ort - torch| / max |torch| <= 1e-4 (max_rel_diff_vs_torch per model)",
        "conditioning": ("weights: He init, random BatchNorm/LayerNorm statistics, then lsuv_normalize on "
                         f"{CALIB_BATCH} standard-normal images (bert_*: random token ids), seed model seed + "
                         f"{CALIB_SEED_OFFSET}: in forward order each BatchNorm2d output -> std 1, mean 0 "
                         "(gamma /= std, beta = (beta - mean) / std over the whole output), each Conv2d/Linear "
                         "and attention projection output -> RMS 1 (weight, bias /= RMS), LayerNorm gamma "
                         f"squeezed to 1 +- {LN_GAMMA_SPREAD}; per model under 'conditioning'"),
        "int8_verification": ("onnxruntime.quantization: quant_pre_process on a copy with the dynamic axes fixed "
                              "(batch 1, sequence 16), then quantize_static(QDQ, QInt8 activations, QInt8 weights, "
                              f"MinMax, per_channel=True), calibrated on {INT8_CALIB_COUNT} inputs (seed "
                              f"{INT8_CALIB_SEED}), evaluated on {INT8_EVAL_COUNT} others (seed {INT8_EVAL_SEED}); "
                              "images standard normal, bert_* random token ids with random lengths. "
                              "ort_int8_rel_rmse = sqrt(mean((y_q - y_f)^2)) / sqrt(mean(y_f^2)) of the first output; "
                              "output_input_dependence = RMS over elements of the std over the evaluation inputs / "
                              "RMS(y_f); max_abs_activation = max |x| over every runtime tensor on the calibration "
                              f"inputs; goal ort_int8_rel_rmse <= {INT8_GOAL}, a 'diagnosis' is added above it; "
                              "'before_normalization' = same figures without lsuv_normalize"),
        "dynamo_default_opset": sorted({e["opset"] for e in manifest if e["exporter"] == f"{dyn}, default opset"}),
        "exporter_failures": failures,
        "int8_above_goal": int8_above_goal,
        "total_bytes_without_manifest": total,
        "op_types_all": sorted(op_types_all),
        "supported_ops": sorted(SUPPORTED_OPS),
        "not_yet_supported": not_yet,
        "supported_ops_not_in_zoo": sorted(SUPPORTED_OPS - op_types_all),
        "models": manifest,
        "supported_op_usages": supported_usage,
    }
    with open(os.path.join(OUT_DIR, "MANIFEST.json"), "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    print(f"total size of {OUT_DIR}: {total} bytes")
    print("not yet supported:", sorted(unsupported))
    if failures:
        print("exporter failures:", [f["name"] for f in failures])
    assert total < MAX_ZOO_BYTES, total


if __name__ == "__main__":
    main()
