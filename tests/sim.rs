//! The deterministic simulator of whole shards (`collab_engine::sim`, docs/simulation.md) over
//! many seeds, on the disk backend and on the simulated database. `SIM_SEED=N` replays one
//! seed (on both); `SIM_SEEDS=N` runs N seeds on the disk (default 200) and N/4 on the
//! database (default 60), from `SIM_SEED_BASE` (default 1).

use collab_engine::sim::{self, Counts, Violation};

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    match value.trim().parse() {
        Ok(n) => Some(n),
        Err(e) => panic!("{name}={value:?} is not a number: {e}"),
    }
}

/// Runs `run` over the seeds the environment asks for (`n_default` of them by default) and
/// returns the summed counts; panics with the first violation, which names its seed.
fn run_seeds(
    run: fn(u64) -> Result<Counts, Violation>,
    n_default: u64,
    share: u64,
) -> (u64, Counts) {
    let seeds: Vec<u64> = match env_u64("SIM_SEED") {
        Some(seed) => vec![seed],
        None => {
            let base = env_u64("SIM_SEED_BASE").unwrap_or(1);
            let n = env_u64("SIM_SEEDS").map_or(n_default, |n| (n / share).max(1));
            (base..base + n).collect()
        }
    };
    let mut totals = Counts::default();
    for &seed in &seeds {
        match run(seed) {
            Ok(counts) => {
                totals.acked += counts.acked;
                totals.crashes += counts.crashes;
                totals.power_cuts += counts.power_cuts;
                totals.connects += counts.connects;
                totals.storage_faults += counts.storage_faults;
                totals.closes_1013 += counts.closes_1013;
                totals.garbage += counts.garbage;
            }
            Err(violation) => panic!("{violation}"),
        }
    }
    eprintln!("{} seeds: {totals:?}", seeds.len());
    (seeds.len() as u64, totals)
}

#[test]
fn simulated_shards_keep_the_contract() {
    let (n, totals) = run_seeds(sim::run_seed, 200, 1);
    // The scenarios must exercise what they claim to (a simulator that does nothing passes).
    if n >= 100 {
        assert!(totals.acked > 1_000, "{totals:?}");
        assert!(totals.crashes > 0 && totals.power_cuts > 0, "{totals:?}");
        assert!(
            totals.storage_faults > 0 && totals.closes_1013 > 0,
            "{totals:?}"
        );
        assert!(totals.garbage > 0, "{totals:?}");
    }
}

#[test]
fn simulated_shards_on_a_database_with_lost_commits_keep_the_contract() {
    let (n, totals) = run_seeds(sim::run_seed_on_db, 60, 4);
    if n >= 30 {
        assert!(totals.acked > 300, "{totals:?}");
        assert!(
            totals.storage_faults > 0 && totals.crashes > 0,
            "{totals:?}"
        );
    }
}

#[test]
fn a_seed_replays_exactly() {
    for seed in [7, 4_242] {
        let first = sim::run_seed(seed).unwrap_or_else(|v| panic!("{v}"));
        let second = sim::run_seed(seed).unwrap_or_else(|v| panic!("{v}"));
        assert_eq!(
            first.digest, second.digest,
            "seed {seed}: {first:?} vs {second:?}"
        );
        assert_eq!(first.acked, second.acked);
    }
}

/// Regression, pinned by seed (the generator as of this commit reproduces it; a hand-written
/// script of the same calls did not, so the seed stays): the check of what a power cut would
/// leave found a document whose newest segment had no durable directory entry. A turn whose
/// sync failed had created the segment; `DiskStorage::abort_pending` kept the file but dropped
/// the directories to sync, the document's next use took the file as an existing segment, and
/// the next checkpoint emptied the journal without syncing the directory: a power cut then
/// lost the segment with its acknowledged records (the redo rebuilt only its journaled end,
/// zeros before it). Fixed by carrying those directories to the next checkpoint.
#[test]
fn regression_seed_51142_a_new_segment_of_a_failed_turn_keeps_its_directory_entry() {
    sim::run_seed(51_142).unwrap_or_else(|v| panic!("{v}"));
}
