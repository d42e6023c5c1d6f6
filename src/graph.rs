//! The pipeline graph as Graphviz dot or Mermaid, edges labelled with input and artifact kind.

use crate::pipeline::Pipeline;

pub fn dot(p: &Pipeline) -> String {
    let mut out = format!(
        "digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box, style=rounded];\n",
        esc(&p.name)
    );
    for s in &p.stages {
        out.push_str(&format!(
            "  \"{}\" [label=\"{}\\n({}) → {}\"];\n",
            esc(&s.name),
            esc(&s.name),
            s.kind.name(),
            s.kind.descriptor().output
        ));
    }
    for &i in &p.order {
        let s = &p.stages[i];
        for b in &s.inputs {
            for &u in &b.stages {
                out.push_str(&format!(
                    "  \"{}\" -> \"{}\" [label=\"{}\"];\n",
                    esc(&p.stages[u].name),
                    esc(&s.name),
                    esc(&b.name)
                ));
            }
        }
    }
    out.push_str("}\n");
    out
}

pub fn mermaid(p: &Pipeline) -> String {
    let mut out = String::from("flowchart LR\n");
    for (i, s) in p.stages.iter().enumerate() {
        out.push_str(&format!(
            "  {}[\"{}<br/>{} → {}\"]\n",
            id(i),
            s.name,
            s.kind.name(),
            s.kind.descriptor().output
        ));
    }
    for &i in &p.order {
        let s = &p.stages[i];
        for b in &s.inputs {
            for &u in &b.stages {
                // Quoted: a shell stage's input may be any YAML key (`a|b`, `x y`).
                out.push_str(&format!(
                    "  {} -->|\"{}\"| {}\n",
                    id(u),
                    b.name.replace('"', "#quot;"),
                    id(i)
                ));
            }
        }
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// A stage's Mermaid node id, by index: names can hold `-`, which ids cannot, and a stage
/// named `end` would close the flowchart. The name is the node's label.
fn id(stage: usize) -> String {
    format!("s{stage}")
}
