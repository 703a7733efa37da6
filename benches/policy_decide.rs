//! How long one policy decision takes, for a policy of 50 roles × 20 key rules
//! (plus tool rules and inheritance). Prints ns per decision; not a test.
//!
//!     cargo bench --bench policy_decide
//!
//! Baseline in the same run: the same number of bare GlobSet matches, the floor
//! any glob-based decision pays.
// A test or benchmark program: a panic is its failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::path::Path;
use std::time::Instant;

use cordon::call::{Request, Tool};
use cordon::policy::Policy;
use serde_json::json;

const ROLES: usize = 50;
const RULES: usize = 20;

fn policy_text() -> String {
    let mut t = String::from("[roles.base]\ntools = [\"kv_get\", \"kv_list\"]\nread = [\"/shared/**\"]\ndeny_read = [\"/shared/secret/**\"]\n\n");
    for r in 0..ROLES {
        t.push_str(&format!("[roles.r{r}]\ninherits = [\"base\"]\ntools = [\"kv_*\"]\ndeny_tools = [\"kv_delete\"]\n"));
        let globs = |kind: &str, n: usize| {
            (0..n)
                .map(|i| format!("\"/projects/p{r}/{kind}{i}/*/**\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        // 20 key rules per role: 8 read, 6 write, 3 delete, 3 deny.
        t.push_str(&format!("read = [{}]\n", globs("area", 8)));
        t.push_str(&format!("write = [{}]\n", globs("area", 6)));
        t.push_str(&format!("delete = [{}]\n", globs("area", 3)));
        t.push_str(&format!("deny_write = [{}]\n", globs("locked", 3)));
        t.push_str("limits = { max_value_bytes = 65536, max_txn_ops = 64 }\n\n");
    }
    t
}

fn per_op(label: &str, n: u64, f: impl FnMut(u64)) -> f64 {
    let mut f = f;
    for i in 0..n / 10 {
        f(i);
    }
    let start = Instant::now();
    for i in 0..n {
        f(i);
    }
    let ns = start.elapsed().as_nanos() as f64 / n as f64;
    println!("{label:58} {ns:8.0} ns");
    ns
}

fn main() {
    let text = policy_text();
    let policy = Policy::parse(Path::new("bench.toml"), text).expect("bench policy loads");
    let n = 200_000u64;
    let keys: Vec<String> = (0..64)
        .map(|i| format!("/projects/p{}/area{}/t{i}/item", i % ROLES, i % 10))
        .collect();
    let requests: Vec<Request> = keys
        .iter()
        .map(|k| {
            let args = json!({"key": k, "value": "v"});
            let serde_json::Value::Object(m) = args else {
                unreachable!()
            };
            Request::parse(Tool::Put, m).expect("parses")
        })
        .collect();
    let role_names: Vec<String> = (0..ROLES).map(|r| format!("r{r}")).collect();

    println!("policy: {ROLES} roles x {RULES} key rules (+ tool rules, inherited base), {n} decisions each");
    let set = globset::GlobSet::builder()
        .add(globset::Glob::new("/projects/p1/area0/*/**").unwrap())
        .build()
        .unwrap();
    let floor = per_op("baseline: one GlobSet::is_match", n, |i| {
        black_box(set.is_match(black_box(&keys[(i % 64) as usize])));
    });
    per_op("tool decision (role.tool)", n, |i| {
        let role = policy
            .role(&role_names[(i % ROLES as u64) as usize])
            .unwrap();
        black_box(role.tool(Tool::ALL[(i % 7) as usize]));
    });
    let decide = per_op("tool + limits + key decision on a parsed kv_put", n, |i| {
        let role = policy
            .role(&role_names[(i % ROLES as u64) as usize])
            .unwrap();
        let req = &requests[(i % 64) as usize];
        black_box(role.tool(Tool::Put));
        let _ = black_box(role.check(req, &policy.default_deny));
    });
    per_op("listing filter (role.can_read)", n, |i| {
        let role = policy
            .role(&role_names[(i % ROLES as u64) as usize])
            .unwrap();
        black_box(role.can_read(&keys[(i % 64) as usize]));
    });
    per_op(
        "evaluate incl. JSON argument parsing (explain path)",
        n / 4,
        |i| {
            let args = json!({"key": &keys[(i % 64) as usize], "value": "v"});
            black_box(policy.evaluate(&role_names[(i % ROLES as u64) as usize], "kv_put", &args));
        },
    );
    println!(
        "decision / baseline match: {:.1}x   goal: decision under 2000 ns",
        decide / floor
    );
}
