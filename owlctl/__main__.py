from owlctl.cli.main import run

run()
