"""RepFusion's student (distill.py --student resnet18) as a model family: it probes as any other."""
import torch.nn as nn
import torchvision

MODELS = {"resnet18": {}}


class ResNetStudent(nn.Module):
    """forward_features(images, t, depth) -> the average-pooled output of stage `depth` (1..4, a
    list for several; t is ignored), or its positions (B, H W, C) with pool=False."""

    probe_t = 0

    def __init__(self, img_size=32, name="resnet18"):
        super().__init__()
        self.config = dict(family="resnet", name=name, img_size=img_size, in_chans=3, depth=8,
                           patch_size=1)        # depth 8: a probe reads stage depth // 2 = 4
        self.net = torchvision.models.resnet18(num_classes=1)
        self.net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.net.maxpool = nn.Identity()            # RepFusion's stem: 3 x 3 stride 1, no max-pool
        self.net.fc = nn.Identity()
        self.pca, self.dim = None, 512

    def init_weights(self, active=True):
        """A fresh random network (torchvision's initialisation), for --random-init probes."""
        for m in self.modules():
            if hasattr(m, "reset_parameters") and m is not self:
                m.reset_parameters()

    def forward_features(self, images, t=None, depth=None, noisy=False, pool=True):
        depths = depth if isinstance(depth, (list, tuple)) else [depth or 4]
        if not all(1 <= d <= 4 for d in depths):
            raise ValueError(f"a ResNet student has stages 1..4, not {depths}")
        net, feats = self.net, {}
        x = net.relu(net.bn1(net.conv1(images)))
        for i, stage in enumerate((net.layer1, net.layer2, net.layer3, net.layer4)):
            x = stage(x)
            feats[i + 1] = x.mean(dim=(2, 3)) if pool else x.flatten(2).transpose(1, 2)
        out = [feats[d] for d in depths]
        return out if isinstance(depth, (list, tuple)) else out[0]


def build_model(name, pca=None, img_size=32, **ignored):
    if name not in MODELS:
        raise KeyError(f"unknown student {name!r}; choose from {', '.join(MODELS)}")
    return ResNetStudent(img_size, name)
