#pragma once
// A minimal SVG line plot: panels of named series (x, y), one color per series, with axes,
// tick labels and a legend. Enough to look at training curves without extra dependencies.
#include <algorithm>
#include <cmath>
#include <fstream>
#include <string>
#include <vector>

namespace compare {

struct Series {
  std::string name;
  std::vector<double> x, y;
};

struct Panel {
  std::string title, y_label;
  std::vector<Series> series;
  double y_ref = NAN;  // a dashed horizontal reference line (e.g. a target), NaN for none
};

inline void write_svg(const std::string& path, const std::vector<Panel>& panels) {
  const int w = 720, h = 300, ml = 60, mr = 170, mt = 30, mb = 40;
  const char* colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"};
  std::ofstream out(path);
  out << "<svg xmlns='http://www.w3.org/2000/svg' width='" << w << "' height='" << h * panels.size()
      << "' font-family='sans-serif' font-size='12'>\n<rect width='100%' height='100%' fill='white'/>\n";
  for (std::size_t pi = 0; pi < panels.size(); ++pi) {
    const Panel& p = panels[pi];
    const int y0 = int(pi) * h;
    double xmin = 1e300, xmax = -1e300, ymin = 1e300, ymax = -1e300;
    for (const auto& s : p.series)
      for (std::size_t i = 0; i < s.x.size(); ++i) {
        if (!std::isfinite(s.y[i])) continue;
        xmin = std::min(xmin, s.x[i]);
        xmax = std::max(xmax, s.x[i]);
        ymin = std::min(ymin, s.y[i]);
        ymax = std::max(ymax, s.y[i]);
      }
    if (std::isfinite(p.y_ref)) {
      ymin = std::min(ymin, p.y_ref);
      ymax = std::max(ymax, p.y_ref);
    }
    if (!(xmax > xmin)) xmax = xmin + 1;
    if (!(ymax > ymin)) ymax = ymin + 1;
    const double pad = 0.05 * (ymax - ymin);
    ymin -= pad;
    ymax += pad;
    auto px = [&](double x) { return ml + (x - xmin) / (xmax - xmin) * (w - ml - mr); };
    auto py = [&](double y) { return y0 + mt + (ymax - y) / (ymax - ymin) * (h - mt - mb); };
    out << "<text x='" << ml << "' y='" << y0 + 18 << "' font-weight='bold'>" << p.title << "</text>\n";
    out << "<rect x='" << ml << "' y='" << y0 + mt << "' width='" << w - ml - mr << "' height='" << h - mt - mb
        << "' fill='none' stroke='#888'/>\n";
    for (int t = 0; t <= 4; ++t) {
      const double yv = ymin + (ymax - ymin) * t / 4, xv = xmin + (xmax - xmin) * t / 4;
      out << "<text x='" << ml - 5 << "' y='" << py(yv) + 4 << "' text-anchor='end'>" << std::to_string(yv).substr(0, 5)
          << "</text>\n";
      out << "<text x='" << px(xv) << "' y='" << y0 + h - mb + 15 << "' text-anchor='middle'>" << long(xv) << "</text>\n";
    }
    out << "<text x='" << (ml + w - mr) / 2 << "' y='" << y0 + h - 8 << "' text-anchor='middle'>step</text>\n";
    out << "<text x='12' y='" << y0 + h / 2 << "' transform='rotate(-90 12 " << y0 + h / 2
        << ")' text-anchor='middle'>" << p.y_label << "</text>\n";
    if (std::isfinite(p.y_ref))
      out << "<line x1='" << ml << "' x2='" << w - mr << "' y1='" << py(p.y_ref) << "' y2='" << py(p.y_ref)
          << "' stroke='#444' stroke-dasharray='4 3'/>\n";
    for (std::size_t si = 0; si < p.series.size(); ++si) {
      const auto& s = p.series[si];
      const char* c = colors[si % 6];
      out << "<polyline fill='none' stroke='" << c << "' stroke-width='1.5' points='";
      for (std::size_t i = 0; i < s.x.size(); ++i)
        if (std::isfinite(s.y[i])) out << px(s.x[i]) << "," << py(s.y[i]) << " ";
      out << "'/>\n";
      const int ly = y0 + mt + 16 * int(si) + 10;
      out << "<line x1='" << w - mr + 10 << "' x2='" << w - mr + 30 << "' y1='" << ly << "' y2='" << ly << "' stroke='" << c
          << "' stroke-width='3'/><text x='" << w - mr + 35 << "' y='" << ly + 4 << "'>" << s.name << "</text>\n";
    }
  }
  out << "</svg>\n";
}

}  // namespace compare
