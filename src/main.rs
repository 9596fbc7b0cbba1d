use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use seatsync::config::{Cli, Command};
use seatsync::startup::Application;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) if e.kind() == clap::error::ErrorKind::InvalidUtf8 => {
            // clap does not say which variable; find it.
            let name = non_unicode_setting().unwrap_or_else(|| "an argument".into());
            eprintln!("seatsync: configuration error: {name} is not valid UTF-8");
            return ExitCode::from(2);
        }
        Err(e) => {
            let message = e.to_string();
            let first = message
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("seatsync: configuration error: {first}");
            return ExitCode::from(2);
        }
    };
    seatsync::telemetry::init(cli.config.log_format);
    let serving = !matches!(cli.command, Some(Command::Migrate));
    if let Err(e) = cli.config.validate(serving) {
        eprintln!("seatsync: configuration error: {e}");
        return ExitCode::from(2);
    }
    match cli.command.unwrap_or(Command::Serve) {
        Command::Migrate => {
            // Over the direct connection: the migrations' session lock is
            // not held through a transaction pooler.
            let Some(url) = cli.config.direct_database_url() else {
                eprintln!("seatsync: configuration error: migrate needs DATABASE_URL");
                return ExitCode::from(2);
            };
            match seatsync::db::migrate(url).await {
                Ok(n) => {
                    println!("seatsync: {n} migration(s) applied");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    let setting = if cli.config.listen_database_url.is_some() {
                        "LISTEN_DATABASE_URL"
                    } else {
                        "DATABASE_URL"
                    };
                    eprintln!("seatsync: cannot migrate the database at {setting}: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Serve => {
            let app = match Application::build(cli.config).await {
                Ok(app) => app,
                Err(e) => {
                    eprintln!("seatsync: cannot start: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match app.run_until_stopped().await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("seatsync: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The first setting whose environment variable holds invalid UTF-8.
fn non_unicode_setting() -> Option<String> {
    Cli::command()
        .get_arguments()
        .filter_map(|a| a.get_env())
        .find(|name| std::env::var_os(name).is_some_and(|v| v.to_str().is_none()))
        .map(|name| name.to_string_lossy().into_owned())
}
