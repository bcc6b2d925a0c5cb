//! Regions in their own network namespaces, for the partition tests (root and `ip` from
//! iproute2 needed, as CI has).
//!
//! ```text
//!   this namespace (router, controller, tests)  10.B.0.1
//!        | veth
//!   "wan" namespace (forwards)  10.B.0.2 | 10.B.1.1 | 10.B.2.1 ...
//!        | veth            | veth
//!   region 1: 10.B.1.2   region 2: 10.B.2.2 ...
//! ```
//!
//! Every packet between regions crosses the wan namespace, so a policy rule there
//! (`blackhole` from one region's subnet to another's) drops it silently, as a real
//! partition does (connections time out, nothing is refused), while this namespace still
//! reaches every region. This kernel has no `netem` qdisc, so latency cannot be injected.

use std::process::Command;

pub struct Regions {
    prefix: String,
    base: String,
    count: u32,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip(8) from iproute2 is installed");
    assert!(
        out.status.success(),
        "ip {} failed (the partition tests need root, as CI runs): {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Regions {
    /// `count` region namespaces behind one wan namespace.
    pub fn create(count: u32) -> Regions {
        // Unique per test (several run at once in one process) and per process.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = std::process::id();
        let r = Regions {
            prefix: format!("lf{}x{n}", id % 10_000),
            base: format!("10.{}", 100 + (id.wrapping_mul(8).wrapping_add(n)) % 150),
            count,
        };
        let (p, b) = (&r.prefix, &r.base);
        let wan = format!("{p}-wan");
        ip(&["netns", "add", &wan]);
        ip(&[
            "link",
            "add",
            &format!("{p}-hw"),
            "type",
            "veth",
            "peer",
            "name",
            &format!("{p}-wh"),
        ]);
        ip(&["link", "set", &format!("{p}-wh"), "netns", &wan]);
        ip(&[
            "addr",
            "add",
            &format!("{b}.0.1/30"),
            "dev",
            &format!("{p}-hw"),
        ]);
        ip(&["link", "set", &format!("{p}-hw"), "up"]);
        ip(&[
            "-n",
            &wan,
            "addr",
            "add",
            &format!("{b}.0.2/30"),
            "dev",
            &format!("{p}-wh"),
        ]);
        ip(&["-n", &wan, "link", "set", &format!("{p}-wh"), "up"]);
        ip(&["-n", &wan, "link", "set", "lo", "up"]);
        ip(&[
            "netns",
            "exec",
            &wan,
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv4/ip_forward",
        ]);
        for i in 1..=count {
            let (ns, w, n) = (r.netns(i), format!("{p}-w{i}"), format!("{p}-n{i}"));
            ip(&["netns", "add", &ns]);
            ip(&[
                "-n", &wan, "link", "add", &w, "type", "veth", "peer", "name", &n,
            ]);
            ip(&["-n", &wan, "link", "set", &n, "netns", &ns]);
            ip(&[
                "-n",
                &wan,
                "addr",
                "add",
                &format!("{b}.{i}.1/24"),
                "dev",
                &w,
            ]);
            ip(&["-n", &wan, "link", "set", &w, "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", r.address(i)),
                "dev",
                &n,
            ]);
            ip(&["-n", &ns, "link", "set", &n, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &format!("{b}.{i}.1"),
            ]);
            ip(&[
                "route",
                "add",
                &format!("{b}.{i}.0/24"),
                "via",
                &format!("{b}.0.2"),
            ]);
        }
        r
    }

    pub fn netns(&self, region: u32) -> String {
        format!("{}-r{region}", self.prefix)
    }

    pub fn address(&self, region: u32) -> String {
        format!("{}.{region}.2", self.base)
    }

    /// `ldc up --region-netns` for region `rN`.
    pub fn up_arg(&self, region: u32) -> String {
        format!("r{region}={}@{}", self.netns(region), self.address(region))
    }

    fn rules(&self, a: u32, b: u32, verb: &str) {
        let wan = format!("{}-wan", self.prefix);
        for (from, to) in [(a, b), (b, a)] {
            ip(&[
                "-n",
                &wan,
                "rule",
                verb,
                "from",
                &format!("{}.{from}.0/24", self.base),
                "to",
                &format!("{}.{to}.0/24", self.base),
                "blackhole",
            ]);
        }
    }

    /// Drops every packet between regions `a` and `b`, both ways.
    pub fn partition(&self, a: u32, b: u32) {
        self.rules(a, b, "add");
    }

    pub fn heal(&self, a: u32, b: u32) {
        self.rules(a, b, "del");
    }
}

impl Drop for Regions {
    fn drop(&mut self) {
        let quiet = |args: &[&str]| {
            let _ = Command::new("ip").args(args).output();
        };
        for i in 1..=self.count {
            quiet(&["route", "del", &format!("{}.{i}.0/24", self.base)]);
            quiet(&["netns", "del", &self.netns(i)]);
        }
        quiet(&["netns", "del", &format!("{}-wan", self.prefix)]);
        quiet(&["link", "del", &format!("{}-hw", self.prefix)]);
    }
}
