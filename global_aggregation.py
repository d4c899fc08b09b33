"""Server step: aggregate every pesos_cliente_N.pkl with FedAvg, FedProx, FedMed... and compare them.

`python global_aggregation.py --init` writes pesos_globales_ronda_0.pkl for a new federation;
see `python global_aggregation.py --help`.
"""

import sys

from fedmnist.cli import main_aggregation

if __name__ == "__main__":
    sys.exit(main_aggregation())
