//! What verifying one connection's token costs: `Auth::authorize` (header, signature, claims,
//! scope, revocation list) for HS256 and EdDSA tokens, in-process, no sockets.
//!
//! `cargo run --release --example auth_verify [-- ROUNDS]`: prints, per algorithm and round,
//! the mean microseconds per verification over 2,000 distinct tokens.

use std::time::Instant;

use collab_engine::auth::mint::{ed25519_pem_pair, MintClaims, MintKey};
use collab_engine::auth::{now_unix, Auth, Role};

const TOKENS: usize = 2_000;

fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(5);
    let dir = std::env::temp_dir().join(format!("collab-auth-verify-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let secret = b"a benchmark secret of at least 32 bytes";
    let (private, public) = ed25519_pem_pair(&[9; 32]);
    std::fs::write(dir.join("hs.key"), secret)?;
    std::fs::write(dir.join("ed.pem"), &public)?;
    let auth = Auth::open(&[dir.join("hs.key"), dir.join("ed.pem")], None)?
        .ok_or_else(|| anyhow::anyhow!("keys expected"))?;
    let keys = [
        ("HS256", MintKey::hs256(secret)?),
        ("EdDSA", MintKey::ed25519_pem(private.as_bytes())?),
    ];
    let now = now_unix();
    for (name, key) in &keys {
        let tokens: Vec<String> = (0..TOKENS)
            .map(|i| {
                let claims = MintClaims::new(&format!("user-{i}"), "doc-*", Role::Write, now, 3600);
                key.sign(&claims, None)
            })
            .collect::<Result<_, _>>()?;
        for round in 0..rounds {
            let started = Instant::now();
            for token in &tokens {
                auth.authorize(Some(token), "doc-1", now)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            let us = started.elapsed().as_secs_f64() * 1e6 / TOKENS as f64;
            println!("{name} round {round}: {us:.1} us per verification");
        }
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
