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
non-trivial random statistics), models are in eval mode.

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


def he_init(model: nn.Module) -> None:
    """He (Kaiming) normal init for Conv/Linear weights and small random biases.

    PyTorch's default init shrinks activations layer by layer, which would
    leave the fixtures with tiny outputs; this keeps them of order one.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.1)


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


def build_model(spec: Spec) -> nn.Module:
    torch.manual_seed(spec.seed)
    model = spec.build()
    he_init(model)
    randomize_bn(model, spec.seed + 1000)
    if hasattr(model, "after_init"):
        model.after_init()
    return model.eval()


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
        "dynamo_default_opset": sorted({e["opset"] for e in manifest if e["exporter"] == f"{dyn}, default opset"}),
        "exporter_failures": failures,
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
