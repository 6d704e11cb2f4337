"""The typer application and its command groups; the commands register themselves in the cli modules."""

import typer

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="clinqa: clinical question answering with language models, run privately.",
)
analyze_app = typer.Typer(no_args_is_help=True, help="Analyses of what adaptation changed.")
experiment_app = typer.Typer(no_args_is_help=True, help="Experiments: folders of runs plus one summary table.")
steer_app = typer.Typer(no_args_is_help=True, help="Activation steering: build vectors, sweep layers x alphas.")
index_app = typer.Typer(
    no_args_is_help=True, help="Retrieval indexes (BM25 + dense MiniLM + fusion) over your documents."
)
records_app = typer.Typer(
    no_args_is_help=True, help="Patient records over FHIR R4: load, render, synthesise, question generation."
)
keys_app = typer.Typer(no_args_is_help=True, help="API keys for the service, with SMART-style scopes (stored hashed).")
audit_app = typer.Typer(no_args_is_help=True, help="The service's tamper-evident audit log.")

app.add_typer(analyze_app, name="analyze")
app.add_typer(experiment_app, name="experiment")
app.add_typer(steer_app, name="steer")
app.add_typer(index_app, name="index")
app.add_typer(records_app, name="records")
app.add_typer(keys_app, name="keys")
app.add_typer(audit_app, name="audit")
