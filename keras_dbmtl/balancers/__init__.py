"""Task balancers: `get(name)`, `names()`, and one class per method.

```python
import keras_dbmtl
balancer = keras_dbmtl.balancers.get("dbmtl")          # by registered name
balancer = keras_dbmtl.balancers.DBMTL(beta=0.5, beta_sigma=0.5)
balancer = keras_dbmtl.balancers.PCGrad(loss_transform="log")   # the log transform composes with every method
model.compile(optimizer="adam", loss=..., balancer=balancer)
```

Loss level (1 backward): EW, GLS, RLW, UW, DWA, IMTLL, IGBv2, FAMO, STCH, STL.
Gradient level (T backward): MGDA, GradNorm, PCGrad, GradDrop, GradVac, IMTLG, CAGrad, MTAdam, NashMTL,
MetaBalance, MoCo, AlignedMTL, FairGrad, ExcessMTL, UPGrad, ConFIG, DBMTL. Hybrid: IMTL.
"""

from keras_dbmtl.balancers.base import (
    Aggregation, Balancer, GramianBalancer, JacobianBalancer, LossBalancer, TaskJacobian, TaskLosses,
)
from keras_dbmtl.balancers.registry import get, names, register
from keras_dbmtl.balancers.ew import EW
from keras_dbmtl.balancers.dbmtl import DBMTL
from keras_dbmtl.balancers.gls import GLS
from keras_dbmtl.balancers.rlw import RLW
from keras_dbmtl.balancers.uw import UW
from keras_dbmtl.balancers.dwa import DWA
from keras_dbmtl.balancers.imtl_l import IMTLL
from keras_dbmtl.balancers.igbv2 import IGBv2
from keras_dbmtl.balancers.famo import FAMO
from keras_dbmtl.balancers.stch import STCH
from keras_dbmtl.balancers.stl import STL
from keras_dbmtl.balancers.mgda import MGDA
from keras_dbmtl.balancers.gradnorm import GradNorm
from keras_dbmtl.balancers.pcgrad import PCGrad
from keras_dbmtl.balancers.graddrop import GradDrop
from keras_dbmtl.balancers.gradvac import GradVac
from keras_dbmtl.balancers.imtl_g import IMTLG
from keras_dbmtl.balancers.imtl import IMTL
from keras_dbmtl.balancers.cagrad import CAGrad
from keras_dbmtl.balancers.mtadam import MTAdam
from keras_dbmtl.balancers.nash_mtl import NashMTL
from keras_dbmtl.balancers.metabalance import MetaBalance
from keras_dbmtl.balancers.moco import MoCo
from keras_dbmtl.balancers.aligned_mtl import AlignedMTL
from keras_dbmtl.balancers.fairgrad import FairGrad
from keras_dbmtl.balancers.excessmtl import ExcessMTL
from keras_dbmtl.balancers.upgrad import UPGrad
from keras_dbmtl.balancers.config import ConFIG

__all__ = [
    "Aggregation", "Balancer", "GramianBalancer", "JacobianBalancer", "LossBalancer", "TaskJacobian", "TaskLosses",
    "get", "names", "register",
    "EW", "DBMTL", "GLS", "RLW", "UW", "DWA", "IMTLL", "IGBv2", "FAMO", "STCH", "STL",
    "MGDA", "GradNorm", "PCGrad", "GradDrop", "GradVac", "IMTLG", "IMTL", "CAGrad", "MTAdam", "NashMTL",
    "MetaBalance", "MoCo", "AlignedMTL", "FairGrad", "ExcessMTL", "UPGrad", "ConFIG",
]
