"""The method registry: adding a method = one file + one line here."""
from federated.methods.base import Method
from federated.methods.dpcgan import DPCGAN
from federated.methods.dpcvae import DPCVAE
from federated.methods.fedavg import FedAvg
from federated.methods.fedhypevae import FedHypeVAE
from federated.methods.fedlambda import FedLambda
from federated.methods.fedprox import FedProx
from federated.methods.local import Centralized, Local

METHODS: dict[str, type[Method]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedlambda": FedLambda,
    "local": Local,
    "centralized": Centralized,
    "dpcvae": DPCVAE,
    "dpcgan": DPCGAN,
    "fedhypevae": FedHypeVAE,
}
