//! One Rust participant of the mixed Rust + JavaScript test (`tests/browser/test/mixed.test.js`).
//!
//! `mixed_client URL DOC N_EDITS SEED` joins `DOC` with `collab_engine::client::Client`, makes
//! `N_EDITS` random edits while integrating everyone else's, waits until all of them are
//! acknowledged and prints `acked`. It then reads `sync HEAD` lines from stdin: for each it
//! waits until it has applied every op up to `HEAD` and prints the text as a JSON string.
//! It only talks to the URL it is given.

use std::io::{BufRead, Write};
use std::time::Duration;

use collab_engine::client::{Client, ClientOptions};

const WAIT: Duration = Duration::from_secs(20);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: mixed_client URL DOC N_EDITS SEED");
        std::process::exit(2);
    }
    let (url, doc) = (&args[1], &args[2]);
    let n_edits: usize = args[3].parse().expect("N_EDITS is a number");
    let mut seed: u64 = args[4].parse::<u64>().expect("SEED is a number") | 1;
    let mut rand = move |n: usize| -> usize {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let mut client = Client::connect(url, doc, ClientOptions::default()).expect("joins");
    println!("joined {}", client.replica());
    let words = ["rust ", "ferris ", "🦀", "é", "\n", "x"];
    for _ in 0..n_edits {
        // Integrate what the others sent meanwhile, then edit at a random place.
        client.poll(Duration::from_millis(3)).expect("poll");
        let len = client.text().chars().count();
        if len > 0 && rand(4) == 0 {
            let pos = rand(len);
            let n = 1 + rand((len - pos).min(3));
            client.delete(pos, n).expect("delete");
        } else {
            client
                .insert(rand(len + 1), words[rand(words.len())])
                .expect("insert");
        }
    }
    client.wait_until_acked(WAIT).expect("acknowledged");
    println!("acked {}", client.head());
    std::io::stdout().flush().expect("stdout");
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("stdin");
        let Some(head) = line.strip_prefix("sync ") else {
            continue;
        };
        let head: u64 = head.trim().parse().expect("sync HEAD");
        client.wait_for_head(head, WAIT).expect("catches up");
        println!(
            "text {}",
            serde_json::to_string(&client.text()).expect("json")
        );
        std::io::stdout().flush().expect("stdout");
    }
    client.close();
}
