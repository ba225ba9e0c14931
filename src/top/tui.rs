//! The interactive view: the same table, redrawn every interval in the
//! terminal's alternate screen until `q`, Esc or Ctrl-C. A scrape that
//! fails shows its error in place of the table and is tried again at the
//! next interval.

use super::{snapshot, Snapshot, View};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::widgets::{Block, Paragraph, Row, Table};
use ratatui::Frame;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub fn run(address: SocketAddr, interval: Duration) -> std::io::Result<()> {
    let mut terminal = ratatui::init();
    let result = watch(&mut terminal, address, interval);
    ratatui::restore();
    result
}

fn watch(
    terminal: &mut ratatui::DefaultTerminal,
    address: SocketAddr,
    interval: Duration,
) -> std::io::Result<()> {
    let clock = Instant::now();
    let mut before: Option<Snapshot> = None;
    loop {
        let now = snapshot(address, clock);
        let shown = match &now {
            Ok(n) => Ok(View::from(before.as_ref(), n)),
            Err(e) => Err(format!("cannot read http://{address}/metrics: {e}")),
        };
        terminal.draw(|f| draw(f, &address.to_string(), &shown))?;
        if let Ok(n) = now {
            before = Some(n);
        }
        let deadline = Instant::now() + interval;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if event::poll(left)? {
                if let Event::Key(k) = event::read()? {
                    if quits(k) {
                        return Ok(());
                    }
                }
            }
        }
    }
}

fn quits(k: KeyEvent) -> bool {
    k.kind == KeyEventKind::Press
        && (matches!(k.code, KeyCode::Char('q') | KeyCode::Esc)
            || (k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL)))
}

fn draw(f: &mut Frame, address: &str, shown: &Result<View, String>) {
    let view = match shown {
        Ok(v) => v,
        Err(e) => {
            f.render_widget(
                Paragraph::new(e.as_str()).block(Block::bordered().title(" updraft top ")),
                f.area(),
            );
            return;
        }
    };
    let sources = view.source_lines();
    let sinks = view.sink_lines();
    let [title, top, bottom, help] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(sources.len() as u16 + 2),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(f.area());
    f.render_widget(Paragraph::new(view.title(address)), title);
    f.render_widget(table(&sources, " sources "), top);
    f.render_widget(table(&sinks, " sinks "), bottom);
    f.render_widget(
        Paragraph::new("rates over the last interval; drops and retries since start. q: quit"),
        help,
    );
}

/// A table of `lines` (the first is the header), each column as wide as
/// its widest cell.
fn table<'a, const N: usize>(lines: &'a [[String; N]], title: &'a str) -> Table<'a> {
    let widths: Vec<Constraint> = (0..N)
        .map(|i| {
            let w = lines
                .iter()
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(1);
            Constraint::Length(w as u16)
        })
        .collect();
    let header = Row::new(lines[0].iter().map(String::as_str))
        .style(Style::new().add_modifier(Modifier::BOLD));
    let rows = lines[1..]
        .iter()
        .map(|l| Row::new(l.iter().map(String::as_str)));
    Table::new(rows, widths)
        .header(header)
        .column_spacing(2)
        .block(Block::bordered().title(title))
}
