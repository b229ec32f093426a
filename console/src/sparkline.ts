// A sparkline as inline SVG: the values of the last minutes, gaps where a sample had none.

const W = 120;
const H = 22;

export function sparkline(values: (number | null)[]): SVGSVGElement {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("width", String(W));
  svg.setAttribute("height", String(H));
  // The zero line, so a flat series reads as "at zero" or "at its maximum".
  const base = document.createElementNS(ns, "line");
  base.setAttribute("class", "base");
  base.setAttribute("x1", "0");
  base.setAttribute("x2", String(W));
  base.setAttribute("y1", String(H - 0.5));
  base.setAttribute("y2", String(H - 0.5));
  svg.append(base);
  const finite = values.filter((v): v is number => v !== null && Number.isFinite(v));
  if (finite.length === 0) return svg;
  const max = Math.max(...finite, 1e-9);
  const step = values.length > 1 ? W / (values.length - 1) : W;
  let d = "";
  let pen = false;
  values.forEach((v, i) => {
    if (v === null || !Number.isFinite(v)) {
      pen = false;
      return;
    }
    const x = (i * step).toFixed(1);
    const y = (H - 1 - (v / max) * (H - 2)).toFixed(1);
    d += `${pen ? "L" : "M"}${x},${y}`;
    pen = true;
  });
  const path = document.createElementNS(ns, "path");
  path.setAttribute("d", d);
  svg.append(path);
  const title = document.createElementNS(ns, "title");
  title.textContent = `max ${Math.round(max * 10) / 10} over the last ${values.length} samples`;
  svg.append(title);
  return svg;
}
