"""Entry points: one module per command (`build_parser()`, `main(argv)`), dispatched by `cli.main`."""
