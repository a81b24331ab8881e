"""maxdnn from Python: quantize, assign approximate multipliers at three granularities, measure accuracy and
energy, fine-tune in your own training loop, and explore.

    python examples/tutorial.py PATH/TO/cifar10 [--explore]

Runs on any CIFAR-10 source maxdnn reads (the tests run it on 1,000 lossless training and test images).
"""

import sys

import numpy as np
import torch
import torch.nn.functional as F

import maxdnn

data = sys.argv[1]
train = maxdnn.load_cifar10(data, "train")
test = maxdnn.load_cifar10(data, "test")
print(f"{len(train)} training and {len(test)} test images, {train.images.dtype} {list(train.images.shape[1:])}")

# 1. The integer graph: the committed ResNet-8, calibrated on 500 training images (the same graph on any CPU)
graph = maxdnn.quantize(maxdnn.load_model("resnet8"), train.images[:500])
names = [layer.name for layer in maxdnn.layers(graph)]
print("multiplying layers:", ", ".join(names))
exact = maxdnn.evaluate(graph, test.images, test.labels)
print(f"exact int8: {100 * exact.accuracy:.2f}% on {exact.images} test images")

# 2. Three granularities of approximation
layer = maxdnn.layer_assignment(graph, {n: "roup-p1r2" for n in names[1:]})
f = graph.layers["s1.conv1"].weight.shape[0]
filt = maxdnn.filter_assignment(graph, {"s1.conv1": ["roup-p2r2"] * (f // 2) + ["exact"] * (f - f // 2)})
fo, ci = graph.layers["s3.conv2"].weight.shape[:2]
kern = maxdnn.kernel_assignment(graph, {"s3.conv2": [["roup-p2r4" if (i + j) % 2 else "roup-p1r2" for j in range(ci)]
                                                     for i in range(fo)]})
for label, a in (("layer", layer), ("filter", filt), ("kernel", kern)):
    r = maxdnn.evaluate(graph, test.images, test.labels, a)
    print(f"{label:>6}: {100 * r.accuracy:.2f}%, multiplication energy gain {100 * r.energy_gain:.1f}%, "
          f"PE gain {100 * r.pe_energy_gain:.1f}%")

# 3. Bias correction on training images outside the validation data
r = maxdnn.evaluate(graph, test.images, test.labels, layer, bias_correction=train.images[500:756])
print(f"layer, bias-corrected: {100 * r.accuracy:.2f}%")

# 4. Fine-tuning in your own loop: forward = the integer engine's outputs, gradients straight through
net = maxdnn.approximate(graph, layer)
opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)
x, y = torch.as_tensor(train.images[:64]), torch.as_tensor(train.labels[:64])
for step in range(2):
    loss = F.cross_entropy(net(x) * graph.output_scale, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"step {step}: loss {loss.item():.4f}")
tuned = net.to_graph()
print(f"fine-tuned (2 steps): {100 * maxdnn.evaluate(tuned, test.images, test.labels, layer).accuracy:.2f}%")

# 5. Every user-facing error is one MaxdnnError
try:
    maxdnn.layer_assignment(graph, {"no-such-layer": "roup-p1r2"})
except maxdnn.MaxdnnError as e:
    print("error:", e)

# 6. The exploration (minutes even at its smallest budget)
if "--explore" in sys.argv:
    run = maxdnn.explore("runs/tutorial", data, budget="tiny", approaches=["layer", "kernel"], progress=False)
    for ap, per in run.best.items():
        print(ap, {t: p and round(100 * p["energy_gain"], 1) for t, p in per.items()})
