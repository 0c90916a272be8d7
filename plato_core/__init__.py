"""plato_core: the learning machinery every Plato model shares, whatever it learns (scenes or proteins).

Where things live:

* ``trainer``   the one Trainer of Plato (model interface: ``loss(batch, step) -> dict``, ``"loss"`` = total):
                budgets, checkpoints, resume, logs, DDP
* ``settings``  settings dataclasses -> command-line flags and back (``setting``, ``add_settings``,
                ``settings_from_args``), the shared run flags (``add_run_args``, ``run_config``), ``SettingError``
* ``runinfo``   run folders: ``config.json`` (run kind and format), ``load_run(path)`` for any run, the
                output-folder rule, atomic writes, ``UserError`` and the CLI entry point (one line, exit 2)
* ``objective`` Gaussian KL, Gaussian log-likelihood, reparameterisation, bits/dim
* ``encoders``  ConvNet image encoder -> Gaussian q(z | x)

Imports go renderers <- plato_core <- scene3d <- cryoem: nothing here knows about scenes or cryo-EM.
"""
