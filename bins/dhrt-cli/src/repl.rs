//! The interactive REPL: line editing and history (rustyline, history in
//! `~/.dhrt_history`), completion of command names, `help`. Reads piped
//! stdin too, so scripts can drive it.

use std::io::Write;
use std::process::ExitCode;

use rustyline::completion::Completer;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::validate::Validator;
use rustyline::{Context, Editor, Helper};

use crate::command::{self, Command};

/// Completes command names in the first word.
struct Commands;

impl Completer for Commands {
    type Candidate = String;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<String>)> {
        let typed = &line[..pos];
        if typed.contains(char::is_whitespace) {
            return Ok((pos, Vec::new()));
        }
        let names = command::NAMES
            .iter()
            .filter(|n| n.starts_with(typed))
            .map(|n| (*n).to_string())
            .collect();
        Ok((0, names))
    }
}

impl Hinter for Commands {
    type Hint = String;
}
impl Highlighter for Commands {}
impl Validator for Commands {}
impl Helper for Commands {}

fn history_path() -> Option<std::path::PathBuf> {
    std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".dhrt_history"))
}

/// Runs the REPL until `quit`, `exit` or end of input. Errors of single
/// commands are printed and the REPL goes on; failing to connect ends it
/// with exit code 2.
pub(crate) fn run(
    runtime: &tokio::runtime::Runtime,
    target: &crate::Target<'_>,
    json: bool,
) -> ExitCode {
    let addr = target.addr;
    let mut client = match runtime.block_on(crate::connect(target)) {
        Ok(c) => c,
        Err(e @ dhrt_client::Error::Connect { .. }) => {
            crate::print_error(&format!("{e} (is dhrtd running there?)"), json);
            return ExitCode::from(2);
        }
        Err(e) => {
            crate::print_error(&e.to_string(), json);
            return ExitCode::from(2);
        }
    };
    let mut editor: Editor<Commands, rustyline::history::DefaultHistory> = match Editor::new() {
        Ok(e) => e,
        Err(e) => {
            crate::print_error(&format!("cannot start the line editor: {e}"), json);
            return ExitCode::from(2);
        }
    };
    editor.set_helper(Some(Commands));
    let history = history_path();
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    let prompt = format!("{addr}> ");
    // The token to connect again with: the one given, or the last `auth`.
    let mut token: Option<String> = target.token.map(str::to_string);
    loop {
        let line = match editor.readline(&prompt) {
            Ok(line) => line,
            Err(rustyline::error::ReadlineError::Interrupted) => continue,
            Err(_) => break, // end of input
        };
        if line.trim().is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(line.as_str());
        let command = match command::split(&line).and_then(|w| command::parse(&w)) {
            Ok(c) => c,
            Err(e) => {
                println!("(error) {e}");
                continue;
            }
        };
        match command {
            Command::Quit => break,
            Command::Help => println!("{}", command::HELP),
            Command::Token { role, name } => crate::print_token(role, &name),
            Command::Secret => println!("{}", dhrt_proto::auth::new_secret()),
            Command::Watch { .. } => {
                println!("(watching; Ctrl-C returns to the prompt)");
                if let Err(e) = runtime.block_on(crate::watch(target, &command, json)) {
                    println!("(error) {e}");
                }
            }
            _ => {
                if let Command::Auth { token: given } = &command {
                    token = Some(given.clone());
                }
                let mut out = Vec::new();
                let mut result =
                    runtime.block_on(crate::execute(&client, &command, json, &mut out));
                if let Err(dhrt_client::Error::Disconnected(_)) = result {
                    // The node closed the connection while the prompt
                    // waited (the idle timeout, or no token shown within
                    // 10 s on a node with an auth file): connect again,
                    // with the token known so far, and try once more.
                    let again = crate::Target {
                        token: token.as_deref(),
                        ..*target
                    };
                    match runtime.block_on(crate::connect(&again)) {
                        Ok(c) => {
                            client = c;
                            out.clear();
                            result =
                                runtime.block_on(crate::execute(&client, &command, json, &mut out));
                        }
                        Err(e) => {
                            println!("(error) {e}");
                            continue;
                        }
                    }
                }
                match result {
                    Ok(_) => {
                        let _ = std::io::stdout().write_all(&out);
                    }
                    Err(e) => println!("(error) {e}"),
                }
            }
        }
    }
    if let Some(h) = &history {
        let _ = editor.save_history(h);
    }
    ExitCode::SUCCESS
}
