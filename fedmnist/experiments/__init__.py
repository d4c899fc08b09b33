"""The experiments behind ``ensayo_aprendizaje_federado.md``, reproducible with one command.

``fedmnist experiments --profile quick|full --out resultados`` runs every experiment of the essay
on the real MNIST with the shared CNN, the same seed and initial weights for every method, and writes
small result files (CSV, JSON, PNG) plus ``entorno.json`` (command, seeds, software versions, seconds).

One module per experiment of the essay's section 3: ``course`` (§3.1 and §3.2), ``ceiling`` (the
central model trained to early stopping on validation over several seeds, the reference of every
federated number), ``drift`` (§3.3), ``heterogeneity`` (§3.4), ``fedprox_mu`` (§3.5), ``attacks`` (§3.6), ``mcmahan`` (§3.7) and
``privacy`` (§3.8); ``profiles`` says how much of each runs, ``common`` holds what the runners
share, and ``run`` drives them. The course flow, the drift grid (``fedmnist.drift_grid``), the
heterogeneity, FedProx-μ and attack experiments repeat every run over the profile's seeds and keep
one CSV row per seed; their tables (``fedmnist.result_tables``) give the mean with a 95 % Student-t
interval across seeds and paired comparisons (``fedmnist.stats``), their figures
(``fedmnist.figures``) the same. FedProx's μ is chosen on a validation split of the training set for
every setting, never on the test set. Every multi-round run lives in its own
``simulaciones/<name>`` directory and continues its checkpoint (the drift grid its finished blocks),
so an interrupted command picks up where it stopped. ``fedmnist.essay`` turns the files into the
Markdown tables the essay quotes and writes them into it; a test checks that the essay's tables
equal what the committed files give.
"""

from fedmnist.experiments.attacks import ATTACK_CSV, ATTACK_TUNING_CSV
from fedmnist.experiments.ceiling import CEILING_CSV
from fedmnist.experiments.common import read_csv
from fedmnist.experiments.course import COURSE_CSV, COURSE_TUNING_CSV, INIT_CSV
from fedmnist.experiments.drift import DRIFT_CSV, DRIFT_TUNING_CSV
from fedmnist.experiments.fedprox_mu import PROX_CSV
from fedmnist.experiments.heterogeneity import HETERO_CSV, HETERO_TUNING_CSV
from fedmnist.experiments.mcmahan import MCMAHAN_CSV, MCMAHAN_TUNING_CSV
from fedmnist.experiments.privacy import PRIVACY_CSV, PRIVACY_TUNING_CSV, TEAM_PRIVACY_CSV
from fedmnist.experiments.profiles import PROFILES, Profile
from fedmnist.experiments.run import ENV_FILE, EXPERIMENTS, run_experiments

__all__ = [
    "ATTACK_CSV",
    "ATTACK_TUNING_CSV",
    "CEILING_CSV",
    "COURSE_CSV",
    "COURSE_TUNING_CSV",
    "DRIFT_CSV",
    "DRIFT_TUNING_CSV",
    "ENV_FILE",
    "EXPERIMENTS",
    "HETERO_CSV",
    "HETERO_TUNING_CSV",
    "INIT_CSV",
    "MCMAHAN_CSV",
    "MCMAHAN_TUNING_CSV",
    "PRIVACY_CSV",
    "PRIVACY_TUNING_CSV",
    "PROFILES",
    "PROX_CSV",
    "TEAM_PRIVACY_CSV",
    "Profile",
    "read_csv",
    "run_experiments",
]
